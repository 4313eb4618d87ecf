"""genfarm's own pipeline without a model: rows/s through read -> render -> generate -> commit -> ledger with an echo
engine, what each process spends per row, and what resuming a 10M-row job reads before any row moves.

    python -m benchmarks.pipeline                 # 100,000 rows through 1 and 2 actors; resume at 10M rows (~15 min)
    python -m benchmarks.pipeline --rows 20000 --resume-rows 1000000

The echo engine (tests/unit/echo_engine.py, named as such wherever it is used) "generates" the last words of each
prompt back at once: what is measured is genfarm and Ray Data, not a model. While a job runs, the CPU time of every
process is sampled (psutil): the driver, the engine actors, Ray's other workers (read tasks, Ray Data's coordinators)
and Ray's daemons, counted while rows flow (from the first row's start to the last one's end, as the output's
started_at/finished_at say). Rows per CPU-second of a process is the rate it could carry with a core of its own: the
driver's is the most rows/s one driver can feed, however many engines; an actor's, what genfarm adds per row beside
its engine.

Resume: an output folder holding N committed rows of --resume-files input files in parts of --part-rows rows (the
parts a job with workers.batch_size = part rows leaves), then, in a fresh process, what a re-run reads before any row
moves: Ledger.count (every part's footer) and the one listing of the parts (the driver's), and Ledger.done_ids for one
file (the ids of its parts: each file's reader does this once), timed, with the process's peak memory.
Writes benchmarks/results/pipeline.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_S = 0.25


def echo_engine():
    """The echo engine of genfarm's plumbing tests, shipped to Ray's workers by value (tests/ is no package)."""
    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    import echo_engine
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(echo_engine)
    return echo_engine.EchoEngine(max_prompt_words=10_000)


# --- the pipeline's rate, and each process's CPU per row ----------------------------------------------------------

def kind(process) -> str:
    """Which part of a job a process is: the driver, an engine actor, another Ray worker, or a Ray daemon."""
    if process.pid == os.getpid():
        return "driver"
    title = " ".join(process.cmdline())
    if "GenerateWorker" in title:
        return "engine actors"
    if title.startswith("ray::"):
        return "other Ray workers"
    return "Ray daemons"


class CpuSampler:
    """CPU seconds of this process and its descendants, sampled every SAMPLE_S until stopped; `spent(t0, t1)` gives
    what each kind of process spent between two wall-clock times (the rows' flow, without start-up and shutdown)."""

    def __init__(self):
        import psutil

        self.psutil, self.me = psutil, psutil.Process()
        self.history: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.sample()
        self.thread.start()

    def sample(self) -> None:
        seen = {}
        for process in [self.me, *self.me.children(recursive=True)]:
            try:
                user, system = process.cpu_times()[:2]
                seen[process.pid] = (kind(process), user + system)
            except self.psutil.Error:
                continue
        self.history.append((time.time(), seen))

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_S):
            self.sample()

    def finish(self) -> None:
        self.sample()
        self.stop.set()
        self.thread.join()

    def at(self, moment: float) -> dict[int, tuple[str, float]]:
        """Every process's CPU seconds as last sampled at or before `moment` (an exited one keeps its last)."""
        known: dict[int, tuple[str, float]] = {}
        for when, seen in self.history:
            if when > moment:
                break
            known.update(seen)
        return known

    def spent(self, start: float, end: float) -> dict[str, float]:
        before, after = self.at(start), self.at(end)
        totals: dict[str, float] = {}
        for pid, (name, seconds) in after.items():
            totals[name] = totals.get(name, 0.0) + seconds - before.get(pid, (name, 0.0))[1]
        return totals


def run_pipeline(rows: int, actors: int, batch_size: int, work: Path) -> dict:
    import pandas as pd

    from genfarm.batch.job import run_job
    from genfarm.models import DEFAULT_MODEL
    from genfarm.spec import JobSpec

    source = work / "input.jsonl"
    with open(source, "w") as out:
        for i in range(rows):
            out.write(json.dumps({"id": f"r{i:09d}", "topic": f"topic number {i % 997}"}) + "\n")
    job = JobSpec.model_validate({
        "input": {"path": str(source), "id_column": "id"}, "task": {"type": "article"},
        "model": {"name": DEFAULT_MODEL}, "engine": {"cpus_per_worker": 1},
        "sampling": {"max_tokens": 8, "temperature": 0}, "quality": {"truncated": "flag"},
        "workers": {"count": actors, "batch_size": batch_size}, "output": {"path": str(work / "out")},
    })
    sampler = CpuSampler()
    t0 = time.monotonic()
    summary = run_job(job, show_progress=False, engine=echo_engine())
    wall = time.monotonic() - t0
    sampler.finish()
    times = pd.read_parquet(work / "out", columns=["started_at", "finished_at"])
    first, last = times["started_at"].min().timestamp(), times["finished_at"].max().timestamp()
    flowing = last - first
    cpu = sampler.spent(first, last)
    done = summary["completed_rows"] + summary.get("error_rows", 0)
    return {"actors": actors, "rows": done, "batch_size": batch_size, "wall_s": wall, "flowing_s": flowing,
            "rows_per_s": done / flowing, "cpu_s": {name: round(seconds, 2) for name, seconds in cpu.items()},
            "rows_per_cpu_s": {name: done / seconds for name, seconds in cpu.items() if seconds > 0},
            "parts": len(list((work / "out").glob("*.parquet")))}


# --- resuming a large job -----------------------------------------------------------------------------------------

def write_ledger(folder: Path, rows: int, part_rows: int, files: int) -> str:
    """An output folder with `rows` committed rows of `files` input files, in parts named as a job names them;
    the key of the first file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from genfarm.batch.ledger import part_name, source_key

    keys = [source_key(str(folder / f"input-{n:05d}.jsonl")) for n in range(files)]
    folder.mkdir(parents=True, exist_ok=True)
    per_file = -(-rows // files)
    for n, key in enumerate(keys):
        end = min((n + 1) * per_file, rows)
        for first in range(n * per_file, end, part_rows):
            ids = [f"r{i:09d}" for i in range(first, min(first + part_rows, end))]
            table = pa.table({"id": ids, "text": ["x" * 16] * len(ids), "completion_tokens": [8] * len(ids)})
            pq.write_table(table, folder / part_name(key, first - n * per_file, ids))
    return keys[0]


def probe_resume(folder: str, key: str) -> None:
    """Child process: what a re-run reads, timed, and this process's peak memory. A job's driver lists the parts
    once (parts_by_source) and each reader reads its own file's; a reader listing the folder itself (done_ids with
    no parts, as genfarm's readers once did) is timed beside it."""
    from genfarm.batch.ledger import Ledger

    ledger = Ledger(folder)
    t0 = time.monotonic()
    counts = ledger.count()
    t1 = time.monotonic()
    by_source = ledger.parts_by_source()
    t2 = time.monotonic()
    done = ledger.done_ids(key, by_source[key])
    t3 = time.monotonic()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ledger.done_ids(key)
    t4 = time.monotonic()
    print(json.dumps({"count_s": t1 - t0, "list_s": t2 - t1, "done_ids_s": t3 - t2, "self_listing_s": t4 - t3,
                      "ids": len(done), "counted": counts.completed, "peak_mb": peak_mb}))


def run_resume(rows: int, part_rows: int, files: int, work: Path) -> dict:
    folder = work / "resume-out"
    t0 = time.monotonic()
    key = write_ledger(folder, rows, part_rows, files)
    made = time.monotonic() - t0
    baseline = json.loads(subprocess.run([sys.executable, "-c", "import json, resource, genfarm.batch.ledger; "
                                          "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))"],
                                         capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    probe = subprocess.run([sys.executable, "-m", "benchmarks.pipeline", "--probe", str(folder), key],
                           capture_output=True, text=True, check=True, cwd=ROOT)
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert found["ids"] == -(-rows // files) and found["counted"] == rows, found
    found["ids_mb"] = found["peak_mb"] - baseline / 1024
    parts = len(list(folder.iterdir()))
    return {"rows": rows, "files": files, "part_rows": part_rows, "parts": parts, "write_s": made,
            "all_readers_s": found["done_ids_s"] * files, "all_self_listing_s": found["self_listing_s"] * files,
            **found}


# --- the report ---------------------------------------------------------------------------------------------------

def report(pipeline: list[dict], resume: list[dict]) -> None:
    import platform

    from benchmarks import report as results_files

    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "engine": "echo engine (instant; no model)"}
    kinds = ("driver", "engine actors", "other Ray workers", "Ray daemons")
    lines = [f"Measured {meta['date']} on {meta['machine']}; {meta['engine']}: genfarm's own pipeline (read, render, "
             "commit, ledger) with no model. Rows per CPU-second: what each process could carry with a core of its "
             "own.", "",
             "| engine actors | rows | batch size | rows/s (rows flowing) | parts | "
             + " | ".join(f"rows per CPU-s: {k}" for k in kinds) + " |",
             "|---|---|---|---|---|" + "---|" * len(kinds)]
    for r in pipeline:
        per = [f"{r['rows_per_cpu_s'][k]:,.0f}" if k in r["rows_per_cpu_s"] else "" for k in kinds]
        lines.append(f"| {r['actors']} | {r['rows']:,} | {r['batch_size']} | {r['rows_per_s']:,.0f} | {r['parts']:,} | "
                     + " | ".join(per) + " |")
    lines += ["", "Resuming: what a re-run reads before any row moves, in a fresh process.", "",
              "| committed rows | input files | rows per part | parts | Ledger.count s (driver: footers) | "
              "listing s (driver, once) | done_ids s (one file's reader) | its ids MB | reader peak MB | "
              "done_ids s, every reader | the same, each reader listing the folder |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in resume:
        lines.append(f"| {r['rows']:,} | {r['files']:,} | {r['part_rows']:,} | {r['parts']:,} | {r['count_s']:.1f} | "
                     f"{r['list_s']:.1f} | {r['done_ids_s']:.2f} | {r['ids_mb']:,.0f} | {r['peak_mb']:,.0f} | "
                     f"{r['all_readers_s']:.1f} | {r['all_self_listing_s']:.1f} |")
    results_files.write("pipeline", {"meta": meta, "pipeline": pipeline, "resume": resume}, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="Rows through the echo pipeline per run.")
    parser.add_argument("--actors", default="1,2", help="Engine actor counts to run, comma-separated.")
    parser.add_argument("--batch-size", type=int, default=1024, help="workers.batch_size of the echo runs.")
    parser.add_argument("--resume-rows", default="10000000",
                        help="Committed rows of the resume measurements, comma-separated (0: none).")
    parser.add_argument("--part-rows", type=int, default=64,
                        help="Rows per committed part in the resume runs (workers.batch_size's default: 64).")
    parser.add_argument("--resume-files", default="1,100",
                        help="Input files the committed rows came from, comma-separated: each a resume run.")
    parser.add_argument("--probe", nargs=2, metavar=("FOLDER", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe_resume(*args.probe)
        return
    pipeline, resume = [], []
    for actors in map(int, args.actors.split(",")):
        work = Path(tempfile.mkdtemp(prefix="gf-pipeline-"))
        print(f"echo pipeline: {args.rows:,} rows, {actors} engine actors ...", flush=True)
        proc = subprocess.run([sys.executable, "-c", "import json, sys; from pathlib import Path; "
                               "from benchmarks.pipeline import run_pipeline; "
                               f"print(json.dumps(run_pipeline({args.rows}, {actors}, {args.batch_size}, "
                               f"Path({str(work)!r}))))"], capture_output=True, text=True, cwd=ROOT)
        shutil.rmtree(work, ignore_errors=True)
        if proc.returncode != 0:
            sys.exit(f"the echo pipeline failed:\n{proc.stderr[-3000:]}")
        pipeline.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  {pipeline[-1]['rows_per_s']:,.0f} rows/s", flush=True)
    for rows in (int(x) for x in args.resume_rows.split(",") if int(x)):
        for files in map(int, args.resume_files.split(",")):
            work = Path(tempfile.mkdtemp(prefix="gf-resume-"))
            print(f"resume: {rows:,} committed rows of {files} files in parts of {args.part_rows} ...", flush=True)
            try:
                resume.append(run_resume(rows, args.part_rows, files, work))
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print(f"  one reader's done_ids {resume[-1]['done_ids_s']:.2f}s, peak {resume[-1]['peak_mb']:,.0f} MB",
                  flush=True)
    report(pipeline, resume)


if __name__ == "__main__":
    main()
