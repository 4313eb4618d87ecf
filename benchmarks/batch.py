"""genfarm vs bare vLLM vs ray.data.llm: the same prompts, model, engine settings and sampling, in one run.

    python -m benchmarks.batch                      # both layouts and scenarios, all three systems, two rounds
    python -m benchmarks.batch --layout gpu-node --scenario articles --systems bare,genfarm,genfarm-ray-up \
        --rounds 4 --name batch-gpu-node-articles     # one scenario, more rounds, beside the full run's results

Each system runs in a fresh subprocess, one after another, so none shares a warm process with another:
  bare     vllm.LLM + one LLM.generate call over every prompt: the ceiling
  genfarm  a genfarm batch job end to end: Ray start, read JSONL, render, generate, write Parquet
  raydata  ray.data.llm.build_processor with the same engine settings, writing Parquet too
  genfarm-ray-up  the genfarm job again, submitted to a Ray that is already running (as on a cluster, where Ray is
           up before any job): its start-up without starting Ray; gpu-node layout only
Two layouts, the same for every system:
  gpu-node   the engine on cores - 1 threads, Ray's processes on the spare core: how a GPU node runs, where the
             engine does not need the host's cores and Ray runs beside it
  all-cores  the engine on every core, competing with Ray's processes (a CPU-only machine)
Start-up (process start to the first generation) and the generation phase are reported apart.
Generated tokens are counted from the outputs (EOS allowed, greedy). Back-to-back runs of the same system differ by
up to ~10% on a shared machine, so each round runs every system in turn, the order reversed every other round, and the
rates pool all rounds (tokens over seconds). Writes benchmarks/results/batch.{json,md,png}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report as results_files

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("bare", "genfarm", "raydata", "genfarm-ray-up")
RAY_UP_LAYOUTS = ("gpu-node",)  # a running Ray is the cluster case: GPU nodes
CORES = os.cpu_count() or 1
LAYOUTS = {"gpu-node": max(1, CORES - 1), "all-cores": CORES}  # layout -> the engine's threads
ENGINE = {"max_model_len": 2048, "max_num_seqs": 64, "kv_cache_gib": 2.0}
SCENARIOS = {
    # Article prompts of varied length; realistic outputs that mostly stop at EOS or max_tokens.
    "articles": {"prompts": 128, "max_tokens": 256, "batch_size": 64},
    # Many short prompts, a few output tokens each: per-row overhead dominates.
    "short": {"prompts": 2048, "max_tokens": 4, "batch_size": 256},
}
TOPICS = ("the printing press", "honey bees", "the water cycle", "compound interest", "volcanoes", "black holes",
          "jazz", "recycling", "solar panels", "sleep", "the bicycle", "coffee", "coral reefs", "vaccines", "chess",
          "the internet")
CONTEXT = ("Mention one surprising fact. ", "Include a short example from everyday life. ",
           "End with a practical tip for the reader. ", "Explain one common misconception and correct it. ")
REVIEWS = ("The battery died after two days and support never answered.", "Lovely hotel, friendly staff, great view.",
           "The plot dragged but the acting was superb.", "Arrived broken. Refund took a month.",
           "Best pizza in town, I keep coming back.", "Meh. It does the job, nothing more.")


def rows(scenario: str, n: int) -> list[dict]:
    if scenario == "articles":
        out = []
        for i in range(n):
            extra = "".join(CONTEXT[(i + k) % len(CONTEXT)] for k in range(i % 4))
            out.append({"id": f"a{i:04d}", "topic": f"{TOPICS[i % len(TOPICS)]} (part {i // len(TOPICS) + 1})",
                        "style": "clear and informative. " + extra, "length": f"about {100 + 50 * (i % 4)} words"})
        return out
    return [{"id": f"s{i:05d}", "review": f"{REVIEWS[i % len(REVIEWS)]} (#{i})"} for i in range(n)]


def task_config(scenario: str) -> dict:
    if scenario == "articles":
        return {"type": "article"}
    return {"type": "template", "messages": [{"role": "user", "content": SHORT_TEMPLATE}]}


@functools.cache
def task(scenario: str):
    from genfarm.spec import task_config_class
    from genfarm.task import make_task

    config = task_config(scenario)
    return make_task(task_config_class(config["type"]).model_validate(config))


def messages(scenario: str, row: dict) -> list[dict]:
    """The exact chat each system sends, built by genfarm's own tasks so the prompts are identical."""
    return task(scenario).prompt(row).messages


SHORT_TEMPLATE = "Is this review positive or negative? Answer with one word.\nReview: {{ review }}"


# --- the three systems, each run in its own process ---------------------------------------------------------
def run_bare(model: str, scenario: str, data: list[dict], work: Path, threads: int) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the same in-process engine genfarm uses on CPU
    os.environ["OMP_NUM_THREADS"] = str(threads)  # as genfarm sets it for its engine (engine.cpu_threads)
    t0 = time.monotonic()  # importing vLLM counts, as it does inside genfarm's engine actors
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, max_model_len=ENGINE["max_model_len"], max_num_seqs=ENGINE["max_num_seqs"],
              kv_cache_memory_bytes=int(ENGINE["kv_cache_gib"] * 2**30), enforce_eager=True, seed=0)
    t1 = time.monotonic()
    params = SamplingParams(temperature=0, max_tokens=SCENARIOS[scenario]["max_tokens"])
    outputs = llm.chat([messages(scenario, r) for r in data], params, use_tqdm=False)
    t2 = time.monotonic()
    return {"wall_s": t2 - t0, "startup_s": t1 - t0, "generate_s": t2 - t1,
            "tokens": sum(len(o.outputs[0].token_ids) for o in outputs), "rows": len(outputs)}


def run_genfarm(model: str, scenario: str, data: list[dict], work: Path, threads: int, ray_up: bool = False) -> dict:
    import pandas as pd

    from genfarm.batch.job import run_job, start_ray
    from genfarm.spec import JobSpec

    spec = SCENARIOS[scenario]
    source = work / "input.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in data))
    job = JobSpec.model_validate({
        "input": {"path": str(source), "id_column": "id"}, "task": task_config(scenario), "model": {"name": model},
        "engine": {**ENGINE, "cpu_threads": threads}, "sampling": {"temperature": 0, "max_tokens": spec["max_tokens"]},
        "workers": {"count": 1, "batch_size": spec["batch_size"]}, "output": {"path": str(work / "genfarm-out")},
    })
    if ray_up:  # Ray started and settled before the clock starts, as a cluster's Ray is before a job arrives
        start_ray(job)
        time.sleep(5)
    t0 = time.monotonic()
    summary = run_job(job, show_progress=False)
    wall = time.monotonic() - t0
    df = pd.read_parquet(work / "genfarm-out", columns=["completion_tokens", "started_at", "finished_at"])
    generate = (df["finished_at"].max() - df["started_at"].min()).total_seconds()
    return {"wall_s": wall, "startup_s": wall - generate, "generate_s": generate,
            "tokens": int(df["completion_tokens"].sum()), "rows": summary["completed_rows"]}


def run_raydata(model: str, scenario: str, data: list[dict], work: Path, threads: int) -> dict:
    import pandas as pd
    import ray

    from genfarm.engine import prepare_process_env
    from genfarm.local_ray import use_local_ray_env
    from genfarm.models import ResolvedModel
    from genfarm.spec import EngineSpec

    spec = SCENARIOS[scenario]
    t0 = time.monotonic()
    use_local_ray_env()  # the same Ray settings genfarm's local Ray gets (workers at nice 0)
    # genfarm's engine layout on CPU, in the env every Ray worker inherits: the model runs in the engine process on
    # every core. Without it, Ray gives the engine actor OMP_NUM_THREADS=1 (its one logical CPU) and vLLM's
    # multiprocess CPU layout keeps one of the two cores for a busy-waiting scheduler: ray.data.llm then ran at
    # 0.78x this speed (328 vs 419 tok/s, 128 article prompts).
    prepare_process_env(ResolvedModel(name=model, path=model, revision=""),
                        EngineSpec.model_validate({**ENGINE, "cpu_threads": threads}), gpu=False)
    ray.init(num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    processor = raydata_processor(model, ENGINE, spec["max_tokens"], spec["batch_size"])
    items = [{"id": r["id"], "messages": messages(scenario, r)} for r in data]
    processor(ray.data.from_items(items)).write_parquet(str(work / "raydata-out"))
    wall = time.monotonic() - t0
    df = pd.read_parquet(work / "raydata-out")
    ray.shutdown()
    return {"wall_s": wall, "startup_s": None, "generate_s": None, "tokens": int(df["tokens"].sum()),
            "rows": len(df)}


def raydata_processor(model: str, engine: dict, max_tokens: int, batch_size: int, engines: int = 1):
    """ray.data.llm's processor with genfarm's engine settings: greedy chat, `max_tokens` per answer, `engines`
    replicas of one CPU bundle each (CPU: no GPU bundle, see platform notes); rows out: id, text, tokens,
    prompt_tokens."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs={"max_model_len": engine["max_model_len"], "max_num_seqs": engine["max_num_seqs"],
                       "kv_cache_memory_bytes": int(engine["kv_cache_gib"] * 2**30), "enforce_eager": True},
        batch_size=batch_size, concurrency=engines, placement_group_config={"bundles": [{"CPU": 1}]},
    )
    return build_processor(
        config,
        # Prompts are built up front: the lambdas are shipped to Ray workers and must not need this module.
        preprocess=lambda row: {"id": row["id"], "messages": row["messages"],
                                "sampling_params": {"temperature": 0, "max_tokens": max_tokens}},
        postprocess=lambda row: {"id": row["id"], "text": row["generated_text"],
                                 "tokens": row["num_generated_tokens"], "prompt_tokens": row["num_input_tokens"]},
    )


RUNNERS = {"bare": run_bare, "genfarm": run_genfarm, "raydata": run_raydata,
           "genfarm-ray-up": functools.partial(run_genfarm, ray_up=True)}


def one(system: str, scenario: str, prompts: int, model: str, out: Path, layout: str) -> None:
    """Child process: run one system on one scenario in one layout and write its numbers as JSON."""
    work = Path(tempfile.mkdtemp(prefix=f"gf-bench-{system}-"))
    result = RUNNERS[system](model, scenario, rows(scenario, prompts), work, LAYOUTS[layout])
    result["tokens_per_s"] = result["tokens"] / result["wall_s"]
    result["generate_tokens_per_s"] = result["tokens"] / result["generate_s"] if result["generate_s"] else None
    out.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=[*LAYOUTS, "both"], default="both",
                        help=f"gpu-node: the engine on cores - 1 ({LAYOUTS['gpu-node']}) threads, Ray beside it; "
                        f"all-cores: the engine on all {CORES}.")
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"Comma-separated subset of {','.join(SYSTEMS)}.")
    parser.add_argument("--prompts", type=int, help="Override the scenario's prompt count.")
    parser.add_argument("--rounds", type=int, default=2, help="Times each system runs, in alternating order; "
                                                               "results pool all rounds.")
    parser.add_argument("--name", default="batch", help="Results file name: benchmarks/results/NAME.{json,md,png} "
                        "(a run of some layouts, scenarios or systems beside the full one).")
    parser.add_argument("--one", nargs=2, metavar=("SYSTEM", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from genfarm import models

    model = models.resolve(models.DEFAULT_MODEL).path
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    layouts = list(LAYOUTS) if args.layout == "both" else [args.layout]
    if args.one:
        one(args.one[0], scenarios[0], args.prompts or SCENARIOS[scenarios[0]]["prompts"], model, Path(args.one[1]),
            layouts[0])
        return
    chosen = args.systems.split(",")
    runs = []
    for layout in layouts:
        systems = [s for s in chosen if s != "genfarm-ray-up" or layout in RAY_UP_LAYOUTS]
        for scenario in scenarios:
            prompts = args.prompts or SCENARIOS[scenario]["prompts"]
            for round_no in range(1, args.rounds + 1):
                for system in systems if round_no % 2 else systems[::-1]:
                    print(f"{layout}, {scenario}, round {round_no}: {system} on {prompts} prompts ...", flush=True)
                    runs.append({"layout": layout, "scenario": scenario, "system": system, "prompts": prompts,
                                 "round": round_no, **run_one(system, scenario, prompts, layout)})
                    if not runs[-1].get("failed"):
                        print(f"  {runs[-1]['tokens']} tokens in {runs[-1]['wall_s']:.1f}s", flush=True)
    report(combine(runs), runs, args.name)


def run_one(system: str, scenario: str, prompts: int, layout: str) -> dict:
    out = Path(tempfile.mktemp(suffix=".json"))
    done = subprocess.run([sys.executable, "-m", "benchmarks.batch", "--layout", layout, "--scenario", scenario,
                           "--prompts", str(prompts), "--one", system, str(out)], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return {"failed": True}
    return json.loads(out.read_text())


def combine(runs: list[dict]) -> list[dict]:
    """One row per layout, scenario and system over all rounds: tokens over seconds; a system that failed once is
    failed."""
    out = []
    for (layout, scenario, system), group in results_files.by_key(runs, "layout", "scenario", "system").items():
        row = {"layout": layout, "scenario": scenario, "system": system, "prompts": group[0]["prompts"],
               "rounds": len(group)}
        if any(r.get("failed") for r in group):
            out.append({**row, "failed": True})
            continue
        tokens, wall = sum(r["tokens"] for r in group), sum(r["wall_s"] for r in group)
        generate = sum(r["generate_s"] for r in group) if all(r["generate_s"] for r in group) else None
        out.append({**row, "tokens": tokens // len(group), "wall_s": wall / len(group),
                    "startup_s": sum(r["startup_s"] for r in group) / len(group) if generate else None,
                    "tokens_per_s": tokens / wall, "generate_tokens_per_s": tokens / generate if generate else None})
    return out


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else ""


def report(results: list[dict], runs: list[dict], name: str = "batch") -> None:
    import platform

    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {CORES} CPUs, no GPU",
            "model": "SmolLM2-135M-Instruct (bf16)", "engine": ENGINE, "sampling": "greedy, EOS allowed",
            "rounds": max(r["round"] for r in runs), "layouts": {k: f"{v} engine threads" for k, v in LAYOUTS.items()}}
    lines = [f"Measured {meta['date']} on {meta['machine']}; {meta['model']}, {meta['sampling']}, "
             f"max_num_seqs {ENGINE['max_num_seqs']}, {meta['rounds']} rounds pooled (wall s and start-up s: mean "
             "per run). Layouts: gpu-node = the engine on cores - 1 threads and Ray's processes on the spare core "
             "(as on a GPU node); all-cores = the engine on every core, beside Ray's processes.", "",
             "| layout | scenario | system | prompts | generated tokens | wall s | start-up s | tok/s (whole run) "
             "| tok/s (generation) | vs bare (generation) | vs bare (whole) | start-up vs bare | "
             "vs ray.data.llm (whole) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        head = f"| {r['layout']} | {r['scenario']} | {r['system']} | {r['prompts']} |"
        if r.get("failed"):
            lines.append(f"{head} failed | | | | | | | | |")
            continue
        peers = {p["system"]: p for p in results
                 if (p["layout"], p["scenario"]) == (r["layout"], r["scenario"]) and not p.get("failed")}
        bare, raydata = peers.get("bare", {}), peers.get("raydata", {})
        startup = f"{r['startup_s']:.1f}" if r.get("startup_s") is not None else "n/a"
        added = (f"{r['startup_s'] - bare['startup_s']:+.1f} s" if r.get("startup_s") is not None
                 and bare.get("startup_s") is not None and r is not bare else "")
        gen = f"{r['generate_tokens_per_s']:,.0f}" if r.get("generate_tokens_per_s") else "n/a"
        lines.append(f"{head} {r['tokens']:,} | {r['wall_s']:.1f} | {startup} | {r['tokens_per_s']:,.0f} | {gen} | "
                     f"{ratio(r.get('generate_tokens_per_s'), bare.get('generate_tokens_per_s'))} | "
                     f"{ratio(r['tokens_per_s'], bare.get('tokens_per_s'))} | {added} | "
                     f"{ratio(r['tokens_per_s'], raydata.get('tokens_per_s'))} |")
    results_files.write(name, {"meta": meta, "results": results, "runs": runs}, lines)
    plot(results, name)


def plot(results: list[dict], name: str) -> None:
    plt = results_files.pyplot()

    panels = list(dict.fromkeys((r["layout"], r["scenario"]) for r in results))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (layout, scenario) in zip(axes[0], panels):
        ok = [r for r in results if (r["layout"], r["scenario"]) == (layout, scenario) and not r.get("failed")]
        x = range(len(ok))
        ax.bar([i - 0.2 for i in x], [r["tokens_per_s"] for r in ok], width=0.4, label="whole run")
        ax.bar([i + 0.2 for i in x], [r.get("generate_tokens_per_s") or 0 for r in ok], width=0.4,
               label="generation phase")
        ax.set_xticks(list(x), [r["system"] for r in ok], rotation=15, fontsize=8)
        ax.set_ylabel("generated tokens/s")
        ax.set_title(f"{layout}: {scenario} ({ok[0]['prompts'] if ok else 0} prompts)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results_files.RESULTS / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()
