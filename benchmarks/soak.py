"""Overload, soak and faults of `genfarm serve`: what a service does at 4x its capacity for minutes, and when its
replica or its HAProxy is killed under steady load.

    python -m benchmarks.soak                          # the embedded model, 3 minutes at 4x capacity, then faults
    python -m benchmarks.soak --minutes 1 --faults none --model /path/to/model

A. Soak / overload. `genfarm serve` (one replica, limits.max_concurrent = engine.max_num_seqs = capacity) is driven
   by 4 x capacity clients, each sending one request after another until the time is up: non-streaming and streamed
   chat completions, streams the client drops after its first tokens, and requests it drops before any answer
   (a disconnect while queued or generating). A client that got 429 or 503 waits 0.2-1 s (Retry-After is 1 s).
   Acceptable answers: 200, 429, 503, a deliberate 504 (limits.request_timeout_s, genfarm's timeout error), and the
   client's own cancels. Anything else (another status, a broken connection, a stream cut short, an error event
   other than a timeout) is a failure, and so is a request still unanswered past request_timeout_s + SLACK_S (hung).
   Recorded: requests by outcome and per second, the RSS of the GenfarmServer replica process and of its vLLM engine
   processes (VLLM::EngineCore, VLLM::Worker) every SAMPLE_S, and the engine's unfinished requests
   (genfarm_engine_requests on /metrics, vLLM's own count) once the load stops: it must come back to zero.
B. Faults under steady load (--rate requests/s, open loop, half streamed): SIGKILL of the replica process (its engine
   processes are left to genfarm's reaper, which must kill them), then of the HAProxy process. Per fault: the
   requests that failed, by outcome; seconds from the kill until a request sent after it is answered 200; whether
   Serve started a new replica / HAProxy and when; hung requests (none may outlive request_timeout_s + SLACK_S).

Writes benchmarks/results/soak.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path

import httpx
import psutil
import yaml

from benchmarks import report as results_files
from benchmarks.serve import KEY, wait_ready
from genfarm import reaper
from genfarm.serve.deploy import SERVICE_ENV, free_ports

SLACK_S = 10  # a request still open this long past limits.request_timeout_s hangs
SAMPLE_S = 2.0  # memory sampling interval
MIB = 2**20
KINDS = {"chat": 0.3, "stream": 0.3, "stream_cancel": 0.2, "early_cancel": 0.2}  # the soak's mix
PROMPTS = ("Write a haiku about honey bees.", "Explain the water cycle to a child.", "Name three uses of copper.",
           "Why is the sky blue?", "Give me a short tip for sleeping better.", "What is compound interest?",
           "Describe a bicycle in two sentences.", "Tell me one surprising fact about volcanoes.")
ACCEPTABLE = {"200", "200 cancelled mid-stream", "cancelled before answer", "429", "503", "504 timeout",
              "200 + error event timeout"}
GROUPS = {"200": ("200", "200 cancelled mid-stream"), "429": ("429",), "503/504": ("503", "504 timeout",
          "200 + error event timeout"), "cancelled": ("cancelled before answer",)}  # the rest: failed


def now() -> float:
    return time.monotonic()


class Service:
    """`genfarm serve` with `config` on a free port, in a process group of its own, and its processes by role."""

    def __init__(self, config: dict, folder: Path, start_timeout_s: float = 600):
        self.config, self.folder = config, folder
        path = folder / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{port}"
        self.log = folder / "serve.log"
        patient = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}  # a busy machine must not fail the start
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "genfarm", "serve", str(path), "--port", str(port)],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **patient})
        try:
            wait_ready(self.url, self.proc, start_timeout_s)
            [self.host] = psutil.Process(self.proc.pid).children()
            self.mark = (SERVICE_ENV, self.host.environ()[SERVICE_ENV])
            self.host_started = self.host.create_time()
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def roles(self) -> dict[str, list[psutil.Process]]:
        """The service's replica, engine and HAProxy processes now (by process title and name)."""
        found: dict[str, list[psutil.Process]] = {"replica": [], "engine": [], "haproxy": []}
        for process in reaper.family(self.host.pid, self.host_started, self.mark):
            try:
                command, name = " ".join(process.cmdline()), process.name()
            except psutil.Error:
                continue
            if "ServeReplica:" in command and ":GenfarmServer" in command:
                found["replica"].append(process)
            elif command.startswith("VLLM::"):
                found["engine"].append(process)
            elif name == "haproxy":
                found["haproxy"].append(process)
        return found


def rss(processes: list[psutil.Process]) -> int:
    total = 0
    for process in processes:
        with suppress(psutil.Error):
            total += process.memory_info().rss
    return total


class MemorySampler(threading.Thread):
    """RSS of the replica, engine and HAProxy processes every SAMPLE_S, as (seconds since t0, {role: bytes}, pids)."""

    def __init__(self, service: Service, t0: float):
        super().__init__(daemon=True)
        self.service, self.t0 = service, t0
        self.samples: list[dict] = []
        self.stopping = threading.Event()

    def sample(self) -> dict:
        roles = self.service.roles()
        point = {"t": now() - self.t0, **{role: rss(procs) for role, procs in roles.items()},
                 "pids": {role: sorted(p.pid for p in procs) for role, procs in roles.items()}}
        self.samples.append(point)
        return point

    def run(self) -> None:
        while not self.stopping.wait(SAMPLE_S):
            with suppress(Exception):
                self.sample()

    def stop(self) -> None:
        self.stopping.set()
        self.join()


GAUGES = {"genfarm_engine_requests": "engine", "genfarm_running_requests": "running", "genfarm_queue_depth": "queued"}


def engine_requests(url: str) -> dict | None:
    """The service's running, queued and engine-held requests from /metrics, and the disconnects it counted
    (None: no answer)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    found = {"client_disconnects": 0.0}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in GAUGES:
            found[GAUGES[name]] = float(value)
        elif name.startswith("genfarm_client_disconnects_total"):
            found["client_disconnects"] += float(value)
    return found


def wait_idle(url: str, timeout_s: float) -> dict:
    """Polls /metrics until no request runs, waits or is held by the engine: the counts at the start, the last
    ones, and the seconds it took (None: not within timeout_s)."""
    start, first, last = now(), None, None
    while now() - start < timeout_s:
        last = engine_requests(url)
        first = first if first is not None else last
        if last and all(last.get(key) == 0 for key in GAUGES.values()):
            return {"at_stop": first, "at_end": last, "seconds_to_zero": round(now() - start, 1)}
        time.sleep(1)
    return {"at_stop": first, "at_end": last, "seconds_to_zero": None}


# ---- the load ------------------------------------------------------------------------------------------------------

def error_label(status: int, body: bytes) -> str:
    """An error answer's outcome: its status, and for a 504 whether it is genfarm's deliberate timeout."""
    if status == 504:
        with suppress(ValueError, KeyError, TypeError, AttributeError):
            if json.loads(body)["error"]["code"] == "timeout":
                return "504 timeout"
    return str(status)


async def exchange(client: httpx.AsyncClient, body: dict, record: dict, cancel_after: int | None) -> str:
    """One chat completion; `record` follows it (status, content tokens) so a cancel knows how far it got."""
    if not body.get("stream"):
        answer = await client.post("/v1/chat/completions", json=body)
        record["status"] = answer.status_code
        if answer.status_code != 200:
            return error_label(answer.status_code, answer.content)
        record["tokens"] = answer.json()["usage"]["completion_tokens"]
        return "200"
    async with client.stream("POST", "/v1/chat/completions", json=body) as answer:
        record["status"] = answer.status_code
        if answer.status_code != 200:
            return error_label(answer.status_code, await answer.aread())
        async for line in answer.aiter_lines():
            if line == "data: [DONE]":
                return "200"
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return f"200 + error event {event['error'].get('code')}"
            if any(c.get("delta", {}).get("content") for c in event.get("choices", ())):
                record["tokens"] += 1
                if cancel_after is not None and record["tokens"] >= cancel_after:
                    return "200 cancelled mid-stream"  # leaving the block drops the connection
    return "200 stream cut short"


async def request(client: httpx.AsyncClient, model: str, kind: str, rng: random.Random, hang_s: float,
                  max_tokens: int, t0: float) -> dict:
    """One request of `kind`; its outcome, times (seconds since t0) and tokens. Never takes longer than hang_s."""
    stream = kind in ("stream", "stream_cancel") or (kind == "early_cancel" and rng.random() < 0.5)
    body = {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": rng.randint(max(1, max_tokens // 2), max_tokens), "temperature": 0.7}
    if stream:
        body["stream"] = True
    record = {"kind": kind, "stream": stream, "t0": now() - t0, "status": None, "tokens": 0}
    cancel_after = rng.randint(1, 3) if kind == "stream_cancel" else None
    work = asyncio.ensure_future(exchange(client, body, record, cancel_after))
    try:
        async with asyncio.timeout(hang_s):
            if kind == "early_cancel":
                done, _ = await asyncio.wait({work}, timeout=rng.uniform(0.05, 1.0))
                if done:
                    outcome = work.result()
                else:
                    work.cancel()
                    with suppress(asyncio.CancelledError):
                        await work
                    if record["status"] not in (None, 200):  # its error's status line came, its body not yet
                        outcome = error_label(record["status"], b"")
                    else:
                        outcome = "cancelled before answer" if record["tokens"] == 0 else "200 cancelled mid-stream"
            else:
                outcome = await work
    except TimeoutError:
        outcome = "hung"
    except Exception as err:  # noqa: BLE001 - a broken connection, a refused one: the outcome says which
        outcome = f"error {type(err).__name__}"
    finally:
        if not work.done():
            work.cancel()
    record.update(outcome=outcome, t1=now() - t0)
    return record


def http_client(url: str, connections: int, hang_s: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(hang_s, pool=None), limits=limits,
                             headers={"Authorization": f"Bearer {KEY}"})


async def closed_loop(url: str, model: str, clients: int, seconds: float, hang_s: float, max_tokens: int,
                      t0: float, seed: int = 0) -> list[dict]:
    """`clients` clients, each sending requests of the soak's mix one after another for `seconds`."""
    records: list[dict] = []
    end = now() + seconds

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        rng = random.Random(seed * 100_003 + index)
        await asyncio.sleep(rng.uniform(0, 2))  # not every connection in the same millisecond
        while now() < end:
            kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
            record = await request(client, model, kind, rng, hang_s, max_tokens, t0)
            records.append(record)
            if record["status"] in (429, 503) or record["outcome"].startswith("error"):
                await asyncio.sleep(rng.uniform(0.2, 1.0))

    async with http_client(url, clients + 8, hang_s) as client:
        await asyncio.gather(*(client_loop(client, i) for i in range(clients)))
    return records


def soak(service: Service, clients: int, seconds: float, max_tokens: int, t0: float | None = None,
         sampler: MemorySampler | None = None) -> dict:
    """Part A: the load, then the service's request counts until they are back to zero; the summary."""
    spec = service.config["limits"]
    hang_s = spec["request_timeout_s"] + SLACK_S
    t0 = now() if t0 is None else t0
    own_sampler = sampler is None
    sampler = sampler or MemorySampler(service, t0)
    if own_sampler:
        sampler.start()
    start = sampler.sample()
    records = asyncio.run(closed_loop(service.url, service.config["model"]["name"], clients, seconds, hang_s,
                                      max_tokens, t0))
    stopped = now() - t0
    idle = wait_idle(service.url, timeout_s=60)
    end = sampler.sample()
    if own_sampler:
        sampler.stop()
    window = [s for s in sampler.samples if start["t"] <= s["t"] <= end["t"]]
    memory = {role: {"start_mib": start[role] / MIB, "end_mib": end[role] / MIB,
                     "max_mib": max(s[role] for s in window) / MIB} for role in ("replica", "engine", "haproxy")}
    return {"clients": clients, "capacity": spec["max_concurrent"], "max_queued": spec["max_queued"],
            "seconds": seconds, "started_s": start["t"], "load_stopped_s": stopped, "hang_s": hang_s,
            "requests": len(records), **outcomes(records), "memory": memory, "engine_requests": idle,
            "replica_pids": {"start": start["pids"], "end": end["pids"]},
            "longest_request_s": max((r["t1"] - r["t0"] for r in records), default=0), "records": records}


def outcomes(records: list[dict]) -> dict:
    by_outcome: dict[str, int] = {}
    for r in records:
        by_outcome[r["outcome"]] = by_outcome.get(r["outcome"], 0) + 1
    by_outcome = dict(sorted(by_outcome.items(), key=lambda kv: -kv[1]))
    return {"by_outcome": by_outcome, "failures": {k: v for k, v in by_outcome.items() if k not in ACCEPTABLE},
            "hung": by_outcome.get("hung", 0), "by_kind": {k: sum(r["kind"] == k for r in records) for k in KINDS}}


# ---- faults --------------------------------------------------------------------------------------------------------

async def steady(url: str, model: str, rate: float, stop: asyncio.Event, records: list[dict], hang_s: float,
                 max_tokens: int, t0: float) -> None:
    """Open loop: a new request every 1/rate s (half of them streamed) until `stop`, then waits for them all."""
    rng, pending = random.Random(7), set()
    async with http_client(url, 256, hang_s) as client:
        due = now()
        while not stop.is_set():
            kind = "stream" if rng.random() < 0.5 else "chat"
            task = asyncio.create_task(request(client, model, kind, rng, hang_s, max_tokens, t0))
            task.add_done_callback(lambda done: records.append(done.result()))
            pending.add(task)
            task.add_done_callback(pending.discard)
            due += 1 / rate
            await asyncio.sleep(max(0.0, due - now()))
        await asyncio.gather(*pending)


def kill(processes: list[psutil.Process]) -> list[int]:
    for process in processes:
        with suppress(psutil.Error):
            process.kill()
    return [p.pid for p in processes]


async def fault(service: Service, role: str, rate: float, max_tokens: int, t0: float, before_s: float = 10,
                after_s: float = 15, max_wait_s: float = 300) -> dict:
    """SIGKILL the `role` processes (replica or haproxy) under steady load: what failed, and how long until the
    service answered 200 again and Serve had a new process in their place."""
    hang_s = service.config["limits"]["request_timeout_s"] + SLACK_S
    records: list[dict] = []
    stop = asyncio.Event()
    load = asyncio.create_task(steady(service.url, service.config["model"]["name"], rate, stop, records, hang_s,
                                      max_tokens, t0))
    await asyncio.sleep(before_s)
    before = await asyncio.to_thread(service.roles)
    engines = before["engine"] if role == "replica" else []
    killed = kill(before[role])
    killed_at = now() - t0
    print(f"killed {role} pids {killed} at {killed_at:.1f}s", flush=True)
    recovered = restarted = engines_gone = None
    while now() - t0 - killed_at < max_wait_s and (recovered is None or restarted is None or
                                                    (engines and engines_gone is None)):
        await asyncio.sleep(0.5)
        since = now() - t0 - killed_at
        if recovered is None:
            answered = [r["t1"] for r in records if r["t0"] >= killed_at and r["outcome"] == "200"]
            recovered = min(answered) - killed_at if answered else None
        if restarted is None:
            current = (await asyncio.to_thread(service.roles))[role]
            if [p for p in current if p.pid not in killed and reaper.alive(p)]:
                restarted = since
        if engines and engines_gone is None and not any(reaper.alive(p) for p in engines):
            engines_gone = since
        if recovered is not None and since > recovered + 30:  # answering: what is still missing will not come
            break
    if engines and engines_gone is None:  # the reaper did not do its job: do it, and say so
        kill(engines)
    await asyncio.sleep(after_s if recovered is not None else 0)
    stop.set()
    await load
    hit = [r for r in records if r["t1"] >= killed_at]  # ended after the kill
    failed = [r for r in hit if r["outcome"] != "200"]
    idle = await asyncio.to_thread(wait_idle, service.url, 40)
    return {"fault": f"SIGKILL {role}", "killed_pids": killed, "engine_pids": [p.pid for p in engines],
            "killed_at_s": killed_at, "rate": rate, "requests": len(records), "after_kill": len(hit),
            "failed": len(failed), **{k: v for k, v in outcomes(failed).items() if k in ("by_outcome", "hung")},
            "hung": sum(r["outcome"] == "hung" for r in records), "seconds_to_200": recovered,
            "seconds_to_new_process": restarted, "seconds_to_engines_gone": engines_gone,
            "longest_request_s": max((r["t1"] - r["t0"] for r in records), default=0), "hang_s": hang_s,
            "engine_requests": idle, "records": records}


# ---- the run -------------------------------------------------------------------------------------------------------

def service_config(model: str, max_concurrent: int, max_queued: int, timeout_s: float, kv_cache_gib: float,
                   max_tokens: int) -> dict:
    return {"model": {"name": model},
            "engine": {"max_model_len": 2048, "max_num_seqs": max_concurrent, "kv_cache_gib": kv_cache_gib},
            "sampling": {"max_tokens": max_tokens},
            "limits": {"max_concurrent": max_concurrent, "max_queued": max_queued, "request_timeout_s": timeout_s},
            "api_keys": [KEY]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3, help="Length of the soak (part A).")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Model name or path (default: embedded).")
    parser.add_argument("--max-concurrent", type=int, default=32,
                        help="The replica's capacity (limits.max_concurrent = engine.max_num_seqs); the soak "
                             "drives 4x that many clients.")
    parser.add_argument("--max-queued", type=int, default=32, help="limits.max_queued.")
    parser.add_argument("--request-timeout", type=float, default=60, help="limits.request_timeout_s.")
    parser.add_argument("--max-tokens", type=int, default=48, help="Each request asks for max/2..max tokens.")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=4, help="Requests/s of the steady load under faults.")
    parser.add_argument("--faults", nargs="+", default=["replica", "haproxy"], choices=["replica", "haproxy", "none"])
    parser.add_argument("--out", type=Path, default=results_files.RESULTS, help="Folder of soak.{json,md,png}.")
    args = parser.parse_args()
    config = service_config(args.model, args.max_concurrent, args.max_queued, args.request_timeout, args.kv_cache_gib,
                            args.max_tokens)
    folder = Path(tempfile.mkdtemp(prefix="gf-soak-"))
    print(f"service log: {folder / 'serve.log'}", flush=True)
    with Service(config, folder) as service:
        t0 = now()
        sampler = MemorySampler(service, t0)
        sampler.start()
        part_a = soak(service, 4 * args.max_concurrent, args.minutes * 60, args.max_tokens, t0, sampler)
        print(json.dumps({k: v for k, v in part_a.items() if k != "records"}), flush=True)
        part_b = []
        report(args, config, part_a, part_b, sampler.samples, args.out)  # kept if a fault breaks the run
        for role in [f for f in args.faults if f != "none"]:
            part_b.append(asyncio.run(fault(service, role, args.rate, max(8, args.max_tokens // 3), t0)))
            print(json.dumps({k: v for k, v in part_b[-1].items() if k != "records"}), flush=True)
            report(args, config, part_a, part_b, sampler.samples, args.out)
        sampler.stop()


def report(args, config: dict, part_a: dict, part_b: list[dict], samples: list[dict],
           folder: Path = results_files.RESULTS) -> None:
    import platform

    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
            "model": args.model, "config": {k: v for k, v in config.items() if k != "api_keys"},
            "kinds": KINDS, "slack_s": SLACK_S, "sample_s": SAMPLE_S}
    soak_rows = [("clients (4x capacity)", f"{part_a['clients']} (capacity {part_a['capacity']}, "
                                           f"queue {part_a['max_queued']})"),
                 ("duration", f"{part_a['seconds']:.0f} s, {part_a['requests']:,} requests"),
                 *((f"outcome: {k}", f"{v:,}") for k, v in part_a["by_outcome"].items()),
                 ("failures (outside 200/429/503, deliberate 504, own cancels)",
                  ", ".join(f"{k}: {v}" for k, v in part_a["failures"].items()) or "none"),
                 ("hung (no answer by request_timeout_s + 10 s)", str(part_a["hung"])),
                 ("longest request", f"{part_a['longest_request_s']:.1f} s")]
    for role in ("replica", "engine"):
        m = part_a["memory"][role]
        soak_rows.append((f"{role} RSS start / end / max", f"{m['start_mib']:,.0f} / {m['end_mib']:,.0f} / "
                                                           f"{m['max_mib']:,.0f} MiB"))
    idle = part_a["engine_requests"]
    soak_rows.append(("engine requests when the load stopped -> at the end",
                      f"{fmt_counts(idle['at_stop'])} -> {fmt_counts(idle['at_end'])} "
                      f"(zero after {idle['seconds_to_zero']} s)"))
    if idle["at_end"]:
        soak_rows.append(("client disconnects the service counted (genfarm_client_disconnects_total)",
                          f"{idle['at_end']['client_disconnects']:,.0f}"))
    lines = [f"Measured {meta['date']} on {meta['machine']}; model {args.model}, max_tokens {args.max_tokens // 2}-"
             f"{args.max_tokens}, limits.request_timeout_s {args.request_timeout:g}.", "",
             "Soak at 4x capacity:", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in soak_rows)]
    if part_b:
        lines += ["", f"Faults under a steady {args.rate:g} requests/s:", "",
                  "| fault | requests after the kill | failed (by outcome) | s to 200 again | s to a new process "
                  "| engines gone after s | hung | engine requests at the end |", "|---|---|---|---|---|---|---|---|"]
        for f in part_b:
            lines.append(f"| {f['fault']} | {f['after_kill']} | {f['failed']} ("
                         f"{', '.join(f'{k}: {v}' for k, v in f['by_outcome'].items()) or '-'}) | "
                         f"{fmt_s(f['seconds_to_200'])} | {fmt_s(f['seconds_to_new_process'])} | "
                         f"{fmt_s(f['seconds_to_engines_gone']) if f['engine_pids'] else '-'} | {f['hung']} | "
                         f"{fmt_counts(f['engine_requests']['at_end'])} |")
    samples = sorted(samples, key=lambda s: s["t"])
    results_files.write("soak", {"meta": meta, "soak": part_a, "faults": part_b, "memory": samples}, lines, folder)
    plot(part_a, part_b, samples, folder)


def fmt_s(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f}"


def fmt_counts(counts: dict | None) -> str:
    if not counts:
        return "no answer"
    return "/".join(f"{counts.get(k, float('nan')):.0f}" for k in ("engine", "running", "queued")) + \
        " (engine/running/queued)"


def per_second(records: list[dict], start: float, end: float) -> dict[str, list[int]]:
    """Requests ended in each second from start to end, by group (GROUPS, else 'failed')."""
    seconds = max(1, int(end - start) + 1)
    series = {group: [0] * seconds for group in (*GROUPS, "failed")}
    for r in records:
        index = int(r["t1"] - start)
        if 0 <= index < seconds:
            group = next((g for g, members in GROUPS.items() if r["outcome"] in members), "failed")
            series[group][index] += 1
    return series


def plot(part_a: dict, part_b: list[dict], samples: list[dict], folder: Path) -> None:
    plt = results_files.pyplot()

    fig = plt.figure(figsize=(11, 7))
    grid = fig.add_gridspec(2, 2)
    rates, memory, faults = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    colors = {"200": "tab:green", "429": "tab:orange", "503/504": "tab:purple", "cancelled": "tab:gray",
              "failed": "tab:red"}

    def draw(ax, records, start, end, title):
        for group, counts in per_second(records, start, end).items():
            if any(counts):
                ax.plot([start + i + 0.5 for i in range(len(counts))], counts, label=group, color=colors[group], lw=1)
        ax.set_title(title)
        ax.set_xlabel("seconds since the soak started")
        ax.set_ylabel("requests/s (by end time)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    draw(rates, part_a["records"], part_a["started_s"], part_a["load_stopped_s"],
         f"soak: {part_a['clients']} clients, capacity {part_a['capacity']}")
    times = [s["t"] for s in samples]
    for role, color in (("replica", "tab:blue"), ("engine", "tab:brown")):
        memory.plot(times, [s[role] / MIB for s in samples], label=f"{role} RSS", color=color)
    memory.axvspan(part_a["started_s"], part_a["load_stopped_s"], color="tab:orange", alpha=0.1, label="soak")
    memory.set_title("memory (replica actor, vLLM engine processes)")
    memory.set_xlabel("seconds since the soak started")
    memory.set_ylabel("MiB")
    if part_b:
        records = [r for f in part_b for r in f["records"]]
        draw(faults, records, min(r["t0"] for r in records), max(r["t1"] for r in records),
             "steady load under faults")
        for f in part_b:
            for ax in (faults, memory):
                ax.axvline(f["killed_at_s"], color="black", ls="--", lw=0.8)
            faults.annotate(f["fault"], (f["killed_at_s"], faults.get_ylim()[1] * 0.9), fontsize=8,
                            xytext=(3, 0), textcoords="offset points")
    else:
        faults.set_visible(False)
    memory.grid(alpha=0.3)
    memory.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "soak.png", dpi=120)


if __name__ == "__main__":
    main()
