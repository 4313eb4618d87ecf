"""Shared prompt prefixes: genfarm's prefix-aware order vs the same job prefix-blind vs ray.data.llm, two engines.

    python -m benchmarks.prefix                          # 24 documents x 16 questions, two rounds
    python -m benchmarks.prefix --documents 64 --words 300 --rounds 1

The scenario content teams run every day: many questions about each document. Each row's prompt is the document,
then its question; the rows are shuffled, as a dataset joined from several sources is. Two engines (each on one
thread, beside Ray), the same engine settings, greedy, a few tokens per answer, so the documents' prefill is most
of the work:
  genfarm        a genfarm batch job with workers.prefix_window at its default: each reader window is ordered by
                 prompt, so a document's questions reach one engine together and its prefix cache computes the
                 document once
  genfarm-blind  the same job with workers.prefix_window: 0 (the input's order)
  raydata        ray.data.llm.build_processor, two engine replicas, the input's order
Prompt tokens the engines took and the share their prefix caches held come from genfarm's summary (vLLM's
num_cached_tokens per request); ray.data.llm reports neither hits nor misses. Each system runs in a fresh subprocess,
every round in turn, the order reversed every other round; rates pool the rounds. Writes
benchmarks/results/prefix.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report as results_files

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("genfarm", "genfarm-blind", "raydata")
ENGINES = 2
# A KV cache that holds a fraction of the documents at once, as on any real dataset larger than the cache.
ENGINE = {"max_model_len": 1024, "max_num_seqs": 32, "kv_cache_gib": 0.25, "cpu_threads": 1, "cpus_per_worker": 1}
MAX_TOKENS = 8
BATCH_SIZE = 64
TASK = {"type": "template", "messages": [
    {"role": "system", "content": "Answer the question about the document in a few words."},
    {"role": "user", "content": "Document:\n{{ document }}\n\nQuestion: {{ question }}"}]}
WORDS = ("river market engine garden theory window winter signal harbor village metal orbit paper forest music "
         "letter bridge council harvest crystal engineer journey mirror planet tunnel cotton island ladder museum "
         "needle ocean pilot rocket saddle temple valley wagon anchor basket candle desert feather glacier hammer "
         "jungle kettle lantern meadow nectar oyster pepper quarry ribbon spider thunder umbrella velvet walnut "
         "yellow zephyr").split()
QUESTIONS = ("What is the document about?", "Which place does it mention first?", "Who is the main figure?",
             "What happens at the end?", "What is the tone?", "Which object matters most?", "What season is it?",
             "What is the first word?", "Name one metal it mentions.", "Is there a journey?", "What is built?",
             "Which animal appears?", "What colour is named?", "What is the weather like?", "Who gives advice?",
             "What is the last word?")


def documents(n: int, words: int) -> list[str]:
    rng = random.Random(2026)
    return [f"Document {d}. " + " ".join(rng.choice(WORDS) for _ in range(words)) + "." for d in range(n)]


def rows(n_documents: int, questions: int, words: int) -> list[dict]:
    made = [{"id": f"d{d:03d}-q{q:02d}", "document": text, "question": QUESTIONS[q % len(QUESTIONS)]}
            for d, text in enumerate(documents(n_documents, words)) for q in range(questions)]
    random.Random(7).shuffle(made)
    return made


def run_genfarm(model: str, data: list[dict], work: Path, prefix_window: int | None) -> dict:
    import pandas as pd

    from genfarm.batch.job import run_job
    from genfarm.spec import JobSpec

    source = work / "input.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in data))
    workers = {"count": ENGINES, "batch_size": BATCH_SIZE}
    if prefix_window is not None:
        workers["prefix_window"] = prefix_window
    job = JobSpec.model_validate({
        "input": {"path": str(source), "id_column": "id"}, "task": TASK, "model": {"name": model}, "engine": ENGINE,
        "sampling": {"temperature": 0, "max_tokens": MAX_TOKENS}, "workers": workers,
        "output": {"path": str(work / "out")},
    })
    t0 = time.monotonic()
    summary = run_job(job, show_progress=False)
    wall = time.monotonic() - t0
    df = pd.read_parquet(work / "out", columns=["completion_tokens", "worker_id", "id"])
    cache = summary["run_prefix_cache"]
    # Engines a document's questions went to: 1.0 when every document stayed on one engine
    engines_per_document = df.assign(document=df["id"].str[:4]).groupby("document")["worker_id"].nunique().mean()
    return {"wall_s": wall, "tokens": int(df["completion_tokens"].sum()), "rows": summary["completed_rows"],
            "prompt_tokens": cache["prompt_tokens"], "cached_tokens": cache["cached_tokens"],
            "engines_per_document": float(engines_per_document)}


def run_raydata(model: str, data: list[dict], work: Path) -> dict:
    import pandas as pd
    import ray

    from benchmarks.batch import raydata_processor
    from genfarm.engine import prepare_process_env
    from genfarm.local_ray import use_local_ray_env
    from genfarm.models import ResolvedModel
    from genfarm.spec import EngineSpec, task_config_class
    from genfarm.task import make_task

    t0 = time.monotonic()
    use_local_ray_env()
    prepare_process_env(ResolvedModel(name=model, path=model, revision=""), EngineSpec.model_validate(ENGINE),
                        gpu=False)  # one engine thread, as genfarm's (see benchmarks.batch)
    ray.init(num_cpus=ENGINES + 1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    processor = raydata_processor(model, ENGINE, MAX_TOKENS, BATCH_SIZE, engines=ENGINES)  # prefix cache on: default
    task = make_task(task_config_class("template").model_validate(TASK))  # genfarm's own prompts: identical
    items = [{"id": r["id"], "messages": task.prompt(r).messages} for r in data]
    processor(ray.data.from_items(items)).write_parquet(str(work / "raydata-out"))
    wall = time.monotonic() - t0
    df = pd.read_parquet(work / "raydata-out")
    ray.shutdown()
    return {"wall_s": wall, "tokens": int(df["tokens"].sum()), "rows": len(df),
            "prompt_tokens": int(df["prompt_tokens"].sum()), "cached_tokens": None, "engines_per_document": None}


def one(system: str, n_documents: int, questions: int, words: int, out: Path) -> None:
    """Child process: one system, one run; its numbers as JSON."""
    from genfarm import models

    model = models.resolve(models.DEFAULT_MODEL).path
    work = Path(tempfile.mkdtemp(prefix=f"gf-prefix-{system}-"))
    data = rows(n_documents, questions, words)
    if system == "raydata":
        result = run_raydata(model, data, work)
    else:
        result = run_genfarm(model, data, work, 0 if system == "genfarm-blind" else None)
    out.write_text(json.dumps(result))


def run_one(system: str, args) -> dict:
    out = Path(tempfile.mktemp(suffix=".json"))
    done = subprocess.run([sys.executable, "-m", "benchmarks.prefix", "--documents", str(args.documents),
                           "--questions", str(args.questions), "--words", str(args.words), "--one", system, str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return {"failed": True}
    return json.loads(out.read_text())


def combine(runs: list[dict]) -> list[dict]:
    out = []
    for (system,), group in results_files.by_key(runs, "system").items():
        row = {"system": system, "rounds": len(group)}
        if any(r.get("failed") for r in group):
            out.append({**row, "failed": True})
            continue
        wall, tokens, rows_done = (sum(r[k] for r in group) for k in ("wall_s", "tokens", "rows"))
        prompt = sum(r["prompt_tokens"] for r in group)
        cached = sum(r["cached_tokens"] for r in group) if group[0]["cached_tokens"] is not None else None
        spread = group[0]["engines_per_document"]
        out.append({**row, "rows": rows_done // len(group), "tokens": tokens // len(group), "wall_s": wall / len(group),
                    "rows_per_s": rows_done / wall, "tokens_per_s": tokens / wall,
                    "prompt_tokens": prompt // len(group),
                    "computed_prompt_tokens": (prompt - cached) // len(group) if cached is not None else None,
                    "hit_rate": cached / prompt if cached is not None and prompt else None,
                    "engines_per_document": (sum(r["engines_per_document"] for r in group) / len(group)
                                             if spread is not None else None)})
    return out


def report(results: list[dict], runs: list[dict], args) -> None:
    import platform

    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
            "model": "SmolLM2-135M-Instruct (bf16)", "engines": ENGINES, "engine": ENGINE, "max_tokens": MAX_TOKENS,
            "batch_size": BATCH_SIZE, "documents": args.documents, "questions": args.questions,
            "words_per_document": args.words, "rounds": args.rounds}
    peers = {r["system"]: r for r in results if not r.get("failed")}
    blind, raydata = peers.get("genfarm-blind", {}), peers.get("raydata", {})
    lines = [f"Measured {meta['date']} on {meta['machine']}; {meta['model']}, greedy, {MAX_TOKENS} tokens per answer; "
             f"{args.documents} documents x {args.questions} questions ({args.words} words a document), rows "
             f"shuffled; {ENGINES} engines of one thread each, KV cache {ENGINE['kv_cache_gib']} GiB each, "
             f"max_num_seqs {ENGINE['max_num_seqs']}, batches of {BATCH_SIZE}; {args.rounds} rounds pooled, in "
             "alternating order (wall s: mean per run). Prompt tokens: what the engines took in; computed: those "
             "the prefix cache did not hold (vLLM's num_cached_tokens); ray.data.llm reports no cache figures.", "",
             "| system | rows | wall s | rows/s | tok/s | prompt tokens | computed prompt tokens | prefix cache hit "
             "rate | engines per document | vs genfarm-blind | vs ray.data.llm |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("failed"):
            lines.append(f"| {r['system']} | failed | | | | | | | | | |")
            continue
        computed = f"{r['computed_prompt_tokens']:,}" if r["computed_prompt_tokens"] is not None else "n/a"
        hit = f"{r['hit_rate']:.0%}" if r["hit_rate"] is not None else "n/a"
        spread = f"{r['engines_per_document']:.2f}" if r["engines_per_document"] is not None else "n/a"
        vs = [f"{r['rows_per_s'] / p['rows_per_s']:.2f}x" if p and p is not r else "" for p in (blind, raydata)]
        lines.append(f"| {r['system']} | {r['rows']:,} | {r['wall_s']:.1f} | {r['rows_per_s']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['prompt_tokens']:,} | {computed} | {hit} | {spread} | "
                     f"{vs[0]} | {vs[1]} |")
    results_files.write("prefix", {"meta": meta, "results": results, "runs": runs}, lines)
    plot([r for r in results if not r.get("failed")])


def plot(results: list[dict]) -> None:
    plt = results_files.pyplot()
    fig, (speed, prefill) = plt.subplots(1, 2, figsize=(9, 3.4))
    names = [r["system"] for r in results]
    speed.bar(names, [r["rows_per_s"] for r in results], color="tab:blue")
    speed.set_ylabel("rows/s (whole run)")
    speed.set_title("throughput", fontsize=10)
    prefill.bar(names, [r["prompt_tokens"] for r in results], color="lightgray", label="prompt tokens")
    prefill.bar(names, [r["computed_prompt_tokens"] or 0 for r in results], color="tab:orange",
                label="computed (not from the prefix cache)")
    for x, r in enumerate(results):
        if r["computed_prompt_tokens"] is None:
            prefill.text(x, r["prompt_tokens"] / 2, "cache figures\nnot reported", ha="center", fontsize=8)
    prefill.set_title("prefill work", fontsize=10)
    prefill.legend(fontsize=8)
    for ax in (speed, prefill):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(results_files.RESULTS / "prefix.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=24, help="Documents in the job.")
    parser.add_argument("--questions", type=int, default=16, help="Questions about each document (rows each).")
    parser.add_argument("--words", type=int, default=400, help="Words of each document (the shared prefix).")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="Comma-separated subset of " + ",".join(SYSTEMS))
    parser.add_argument("--rounds", type=int, default=2, help="Times each system runs, in alternating order.")
    parser.add_argument("--one", nargs=2, metavar=("SYSTEM", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args.one[0], args.documents, args.questions, args.words, Path(args.one[1]))
    systems = args.systems.split(",")
    runs = []
    for round_no in range(1, args.rounds + 1):
        for system in systems if round_no % 2 else systems[::-1]:
            print(f"round {round_no}: {system} ...", flush=True)
            runs.append({"system": system, "round": round_no, **run_one(system, args)})
            if not runs[-1].get("failed"):
                print(f"  {runs[-1]['rows']} rows in {runs[-1]['wall_s']:.1f}s", flush=True)
    report(combine(runs), runs, args)


if __name__ == "__main__":
    main()
