"""Driver memory while a batch job streams many rows: it should stay flat, whatever the row count.

    python -m benchmarks.driver_memory [--rows 200000]

Runs a real job (Ray Data + vLLM) on the tiny offline test model with 1-token outputs, so per-row work dominates,
samples the driver's resident memory twice a second, and writes benchmarks/results/driver_memory.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from benchmarks import report as results_files

ROOT = Path(__file__).resolve().parent.parent


class RssSampler(threading.Thread):
    def __init__(self, progress_of):
        super().__init__(daemon=True)
        self.progress_of, self.samples, self.stop = progress_of, [], threading.Event()
        self.process, self.t0 = psutil.Process(), time.monotonic()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.monotonic() - self.t0, self.progress_of(), self.process.memory_info().rss))
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_model

    import genfarm.batch.job as batch_job
    from genfarm.batch.progress import JobProgress
    from genfarm.spec import JobSpec

    work = Path(tempfile.mkdtemp(prefix="gf-memory-"))
    model = tiny_model.build(work / "tiny")
    data = work / "rows.jsonl"
    with data.open("w") as f:
        for i in range(args.rows):
            f.write(json.dumps({"id": f"r{i:07d}", "topic": f"topic {i % 997} of the day"}) + "\n")
    job = JobSpec.model_validate({
        "input": {"path": str(data), "id_column": "id"}, "task": {"type": "article"}, "model": {"name": str(model)},
        "engine": {"max_model_len": 512, "max_num_seqs": 256, "kv_cache_gib": 0.5},
        "sampling": {"max_tokens": 1, "temperature": 0}, "workers": {"batch_size": 256},
        "output": {"path": str(work / "out")},
    })
    done = {"rows": 0}
    original_update = JobProgress.update

    def counting_update(self, rows, tokens, errors):  # sample the same counter the progress bar shows
        original_update(self, rows, tokens, errors)
        done["rows"] = self.done

    JobProgress.update = counting_update
    sampler = RssSampler(lambda: done["rows"])
    sampler.start()
    started = time.monotonic()
    summary = batch_job.run_job(job, show_progress=False)
    seconds = time.monotonic() - started
    sampler.stop.set()
    sampler.join()
    report(args.rows, summary, seconds, sampler.samples)


def report(rows: int, summary: dict, seconds: float, samples: list) -> None:
    plt = results_files.pyplot()
    mib = [(t, r, rss / 2**20) for t, r, rss in samples]
    streaming = [m for _, r, m in mib if r > 0]
    first_half = [m for _, r, m in mib if 0 < r <= rows / 2]
    second_half = [m for _, r, m in mib if r > rows / 2]
    result = {
        "rows": rows, "completed_rows": summary["completed_rows"], "error_rows": summary["error_rows"],
        "seconds": round(seconds, 1), "rows_per_second": round(rows / seconds, 1),
        "rss_mib_at_first_row": round(streaming[0], 1) if streaming else None,
        "rss_mib_max_while_streaming": round(max(streaming), 1) if streaming else None,
        "rss_mib_median_first_half": round(sorted(first_half)[len(first_half) // 2], 1) if first_half else None,
        "rss_mib_median_second_half": round(sorted(second_half)[len(second_half) // 2], 1) if second_half else None,
        "date": time.strftime("%Y-%m-%d"), "machine": f"{psutil.cpu_count()} CPUs, "
                                                      f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
    }
    table = "| " + " | ".join(k for k in result) + " |\n|" + "---|" * len(result) + "\n| " + \
            " | ".join(str(v) for v in result.values()) + " |\n"
    results_files.write("driver_memory", {**result, "samples": mib}, [table])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([r for _, r, _ in mib], [m for _, _, m in mib], lw=1.5)
    ax.set_xlabel("rows committed")
    ax.set_ylabel("driver RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"genfarm driver memory while streaming {rows:,} rows")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(results_files.RESULTS / "driver_memory.png", dpi=120)


if __name__ == "__main__":
    main()
