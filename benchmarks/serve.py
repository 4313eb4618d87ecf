"""genfarm serve vs vLLM's own OpenAI server: the same model, engine settings, prompts and sampling, in one run.

    python -m benchmarks.serve                        # concurrency 1, 8 and 32, two rounds (~12 min on 2 cores)
    python -m benchmarks.serve --concurrency 8 --requests-per-client 4 --rounds 1

Each server runs in its own process, one after the other (each round in turn, the order alternating between
rounds so drift on a shared machine favours neither; the numbers pool every round), and the same client
(streaming chat completions over HTTP, like the openai SDK) drives both:
  vllm     python -m vllm.entrypoints.openai.api_server: vLLM's API server around the same AsyncLLM engine
  genfarm  genfarm serve: HAProxy ingress -> GenfarmServer replica (auth, limits, metrics) -> AsyncLLM
  genfarm-direct  the same replica reached on its own port (Serve's direct ingress): no HAProxy hop
Time to first token (TTFT) is measured at the client, from sending the request to the first streamed token.
Throughput counts generated tokens reported by each server's usage (greedy, EOS allowed, so both generate the
same tokens). Writes benchmarks/results/serve.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from benchmarks import report as results_files
from benchmarks.batch import ROOT, messages, rows
from genfarm.serve.deploy import free_ports

ENGINE = {"max_model_len": 2048, "max_num_seqs": 32, "kv_cache_gib": 1.0}
MAX_TOKENS = 128
KEY = "bench"
MIN_REQUESTS = 16  # per concurrency level, so a median at concurrency 1 is not one of four


def start_vllm(model: str, port: int, log) -> subprocess.Popen:
    return subprocess.Popen([
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
        "smollm2-135m-instruct", "--host", "127.0.0.1", "--port", str(port), "--max-model-len",
        str(ENGINE["max_model_len"]), "--max-num-seqs", str(ENGINE["max_num_seqs"]), "--kv-cache-memory-bytes",
        str(int(ENGINE["kv_cache_gib"] * 2**30)), "--enforce-eager", "--seed", "0", "--api-key", KEY,
        "--uvicorn-log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})


def start_genfarm(model: str, port: int, log, folder: Path) -> subprocess.Popen:
    config = folder / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "smollm2-135m-instruct"}, "engine": ENGINE, "api_keys": [KEY],
        "limits": {"max_concurrent": ENGINE["max_num_seqs"], "max_queued": 256},
    }))
    return subprocess.Popen([sys.executable, "-m", "genfarm", "serve", str(config), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("server not ready")


async def one_request(client: httpx.AsyncClient, url: str, chat: list[dict]) -> dict:
    body = {"model": "smollm2-135m-instruct", "messages": chat, "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as answer:
        answer.raise_for_status()
        async for line in answer.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in event.get("choices", ())):
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"ttft_s": (first or end) - start, "latency_s": end - start, "tokens": tokens}


async def load(url: str, concurrency: int, chats: list[list[dict]]) -> dict:
    """`concurrency` clients, each sending its share of the chats one after another."""
    queue = list(chats)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers={"Authorization": f"Bearer {KEY}"}) as client:
        async def worker() -> list[dict]:
            done = []
            while queue:
                done.append(await one_request(client, url, queue.pop()))
            return done

        await asyncio.gather(*(one_request(client, url, chats[0]) for _ in range(min(concurrency, 4))))  # warm-up
        t0 = time.perf_counter()
        results = [r for part in await asyncio.gather(*(worker() for _ in range(concurrency))) for r in part]
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall,
            "tokens": sum(r["tokens"] for r in results), "ttfts_ms": [r["ttft_s"] * 1000 for r in results]}


def combine(runs: list[dict]) -> list[dict]:
    """One row per system and concurrency over all rounds: tokens over wall time, TTFT over every request."""
    out = []
    for (system, concurrency), group in results_files.by_key(runs, "system", "concurrency").items():
        ttfts = sorted(t for run in group for t in run["ttfts_ms"])
        tokens, wall = sum(r["tokens"] for r in group), sum(r["wall_s"] for r in group)
        out.append({"system": system, "concurrency": concurrency, "rounds": len(group),
                    "requests": sum(r["requests"] for r in group), "tokens": tokens, "wall_s": wall,
                    "tokens_per_s": tokens / wall, "ttft_median_ms": statistics.median(ttfts),
                    "ttft_p99_ms": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]})
    return out


def run_system(system: str, model: str, levels: list[int], per_client: int) -> list[dict]:
    chats = [messages("articles", r) for r in rows("articles", 256)]
    port, folder = free_ports(1)[0], Path(tempfile.mkdtemp(prefix=f"gf-bench-{system}-"))
    log = open(folder / "server.log", "w")
    proc = start_vllm(model, port, log) if system == "vllm" else start_genfarm(model, port, log, folder)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        targets = {system: url}
        if system == "genfarm":  # also straight to the replica's own port (Serve's direct ingress), if it has one
            direct = httpx.get(f"{url}/health", timeout=30).json().get("direct_url")
            if direct:
                targets["genfarm-direct"] = direct
        out = []
        for name, target in targets.items():
            for level in levels:
                result = asyncio.run(load(target, level, chats[: max(level * per_client, MIN_REQUESTS)]))
                out.append({"system": name, **result})
                print(json.dumps({k: v for k, v in out[-1].items() if k != "ttfts_ms"}), flush=True)
        return out
    finally:
        proc.send_signal(signal.SIGTERM)  # both shut down cleanly on it, engine processes included
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=4, help="Requests each client sends in turn.")
    parser.add_argument("--rounds", type=int, default=2,
                        help="Times each server is started and measured, in alternating order (vLLM first, then "
                             "genfarm first), so drift on a shared machine does not favour one; results pool all.")
    args = parser.parse_args()
    from genfarm import models

    model = models.resolve("smollm2-135m-instruct").path
    runs = []
    for round_no in range(args.rounds):
        for system in ("vllm", "genfarm") if round_no % 2 == 0 else ("genfarm", "vllm"):
            runs += [{**run, "round": round_no + 1}
                     for run in run_system(system, model, args.concurrency, args.requests_per_client)]
    report(combine(runs), runs, args.requests_per_client)


def report(results: list[dict], runs: list[dict], per_client: int) -> None:
    import platform

    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
            "model": "SmolLM2-135M-Instruct (bf16)", "engine": ENGINE, "max_tokens": MAX_TOKENS,
            "sampling": "greedy, EOS allowed, streamed chat completions", "requests_per_client": per_client,
            "rounds": max(r["round"] for r in runs)}
    lines = [f"Measured {meta['date']} on {meta['machine']}; {meta['model']}, {meta['sampling']}, max_tokens "
             f"{MAX_TOKENS}, max_num_seqs {ENGINE['max_num_seqs']}, {per_client} requests per client "
             f"(at least {MIN_REQUESTS} per level), "
             f"{meta['rounds']} rounds pooled.", "",
             "| concurrency | system | requests | tokens | tok/s | TTFT median ms | TTFT p99 ms | throughput vs vLLM "
             "| added TTFT median ms | added TTFT p99 ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = next(b for b in results if b["system"] == "vllm" and b["concurrency"] == r["concurrency"])
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        lines.append(f"| {r['concurrency']} | {r['system']} | {r['requests']} | {r['tokens']:,} | "
                     f"{r['tokens_per_s']:,.0f} | {r['ttft_median_ms']:.1f} | {r['ttft_p99_ms']:.1f} | "
                     f"{ratio:.2f}x | {r['ttft_median_ms'] - base['ttft_median_ms']:+.1f} | "
                     f"{r['ttft_p99_ms'] - base['ttft_p99_ms']:+.1f} |")
    results_files.write("serve", {"meta": meta, "results": results, "runs": runs}, lines)
    plot(results)


def plot(results: list[dict]) -> None:
    plt = results_files.pyplot()

    levels = sorted({r["concurrency"] for r in results})
    fig, (tput, ttft) = plt.subplots(1, 2, figsize=(10, 3.8))
    systems = list(dict.fromkeys(r["system"] for r in results))
    width = 0.8 / len(systems)
    for k, system in enumerate(systems):
        mine = {r["concurrency"]: r for r in results if r["system"] == system}
        x = [i - 0.4 + width * (k + 0.5) for i in range(len(levels))]
        tput.bar(x, [mine[c]["tokens_per_s"] for c in levels], width=width, label=system)
        ttft.bar(x, [mine[c]["ttft_median_ms"] for c in levels], width=width, label=f"{system} median")
        ttft.scatter(x, [mine[c]["ttft_p99_ms"] for c in levels], marker="_", s=200, color="black",
                     label="p99" if k == 0 else None)
    for ax, label in ((tput, "generated tokens/s"), (ttft, "time to first token, ms")):
        ax.set_xticks(range(len(levels)), [f"concurrency {c}" for c in levels])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    tput.set_title("throughput")
    ttft.set_title("TTFT (bars: median, dash: p99)")
    fig.tight_layout()
    fig.savefig(results_files.RESULTS / "serve.png", dpi=120)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
