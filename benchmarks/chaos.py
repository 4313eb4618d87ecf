"""Kill trials: real faults at random moments of real `genfarm run` jobs, and what they left behind, checked.

    python -m benchmarks.chaos                                    # 10 trials of each default fault, default model
    python -m benchmarks.chaos --model tiny --trials 3 --faults engine,driver-kill --rows 200 --seed 7
    python -m benchmarks.chaos --faults node --trials 2           # the optional multi-node fault

Every trial is a fresh job (article task, 48 tokens a row, batches of 8) run as a user runs it, `genfarm run JOB.yaml`
in a subprocess, on genfarm's own local Ray (the node fault: on a local multi-node Ray). At a moment drawn from the
seeded generator (uniform over the span of a clean run of the same job, measured first; --window sets it instead) the
fault strikes:
  engine       SIGKILL of the job's engine actor process: the same run must finish
  driver-kill  SIGKILL of the driver and every process it started (its Ray, the engines): the same command again must
               finish
  driver-term  SIGTERM of the driver process (`kill PID`): the same command again must finish
  driver-int   SIGINT to the driver's process group (Ctrl-C in its terminal): exit 130, the same command again finishes
  temp-files   leftovers of crashed writes planted in the output folder while the job runs (half-written parts, JSON and
               hidden `.tmp` files, named as genfarm's atomic writes name their temporary files), then SIGKILL of the
               driver and its processes and more leftovers: the same command again must finish
  node         optional (not in the default set: slower, and less reliable on a small machine): a head (no CPUs) and
               two worker nodes started with `ray start` in temp dirs of their own; every process of the worker node
               that runs an engine is SIGKILLed (its raylet, its workers, its agents): the run must finish (engines
               restart on the other node), or else the same command again
Each trial then checks the output folder: every input row exactly once across results and _errors (pandas.read_parquet
of OUTPUT and OUTPUT/_errors: ids unique and complete), only whole Parquet parts visible to readers, _summary.json
balanced (complete; generated + errors = input rows, as read), `genfarm status` saying complete with the same counts,
and `genfarm inspect` working. Recovery time: from the fault to the end of the run that finished the job. "The same
command again" is run up to 3 times, as an operator would on a machine so loaded that a run fails for reasons of its
own (Ray's start-up timing out); every such failed re-run is listed in the results.

Writes OUT/chaos.{json,md} (OUT: benchmarks/results). A failed trial keeps its folder (path and reason in the JSON and
on stdout) and the tool exits 1; a trial whose job ended before its moment came is 'missed' (counted, not failed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks import report as results_files
from genfarm import reaper

ROOT = Path(__file__).resolve().parent.parent
FAULTS = ("engine", "driver-kill", "driver-term", "driver-int", "temp-files", "node")
DEFAULT_FAULTS = FAULTS[:-1]
MARK = "GENFARM_CHAOS"  # in the environment of every process a trial starts, so its leftovers can be found
RAY = str(Path(sys.executable).parent / "ray")
ENGINE_TITLE = "GenerateWorker"  # in the process title of an engine actor
RERUNS = 3  # most times the same command is run again after a fault


def ctrl_c_as_in_a_terminal() -> None:
    """A shell without job control starts background commands (`cmd &`) with SIGINT ignored, and their children
    inherit that: a run gets Ctrl-C as from a terminal, wherever the harness was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Failed(Exception):
    """A trial's check failed: the reason goes into the results, the folder is kept."""


class Missed(Exception):
    """The job ended (`ended_s` after launch) before the fault could strike."""

    def __init__(self, run: Run, what: str):
        self.ended_s = round(time.monotonic() - run.started, 1)
        super().__init__(f"the job ended {self.ended_s} s after launch, before {what}")


@dataclass
class Run:
    """One `genfarm run` process: its session (it leads one) and the mark its descendants carry."""

    label: str
    process: subprocess.Popen
    started: float  # time.monotonic() at launch
    created: float  # the process's create time, which a reused pid would not have
    mark: tuple[str, str]
    exit: int | None = None
    ended: float | None = None

    def processes(self) -> list[psutil.Process]:
        return reaper.family(self.process.pid, self.created, self.mark)

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float) -> int | None:
        """Its exit code, or None (and every process of it killed) when it ran past `timeout` seconds."""
        try:
            self.exit = self.process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            reaper.kill_all(self.processes())
            self.process.wait()
            self.exit = None
        self.ended = time.monotonic()
        return self.exit

    def record(self) -> dict:
        end = self.ended or time.monotonic()
        code = self.exit if self.exit is not None else "timed out: killed" if self.ended else "killed by the harness"
        return {"run": self.label, "exit": code, "seconds": round(end - self.started, 1)}


@dataclass
class Job:
    """A trial's job: input rows, job file and output folder in `folder`; `env` adds e.g. RAY_ADDRESS."""

    folder: Path
    rows: int
    model: str
    env: dict = field(default_factory=dict)
    workers: int = 1
    runs: list[Run] = field(default_factory=list)

    def __post_init__(self):
        self.out = self.folder / "out"
        self.ids = [f"r{i:05d}" for i in range(self.rows)]
        data = self.folder / "in.jsonl"
        data.write_text("".join(json.dumps({"id": i, "topic": f"topic number {n}"}) + "\n"
                                for n, i in enumerate(self.ids)))
        threads = ", cpu_threads: 1" if self.workers > 1 else ""
        self.file = self.folder / "job.yaml"
        self.file.write_text(
            f"name: chaos\ninput: {{path: {data}, id_column: id}}\ntask: {{type: article}}\n"
            f"model: {{name: {self.model}}}\nengine: {{max_model_len: 512, kv_cache_gib: 0.25{threads}}}\n"
            f"sampling: {{max_tokens: 48}}\nworkers: {{count: {self.workers}, batch_size: 8}}\n"
            f"output: {{path: {self.out}}}\n")

    def command(self) -> list[str]:
        return [sys.executable, "-m", "genfarm", "run", str(self.file), "--no-progress", "--json"]

    def launch(self) -> Run:
        label = f"run{len(self.runs) + 1}"
        mark = (MARK, f"{self.folder}/{label}")
        with open(self.folder / f"{label}.out", "w") as out, open(self.folder / f"{label}.err", "w") as err:
            process = subprocess.Popen(self.command(), stdout=out, stderr=err, cwd=self.folder,
                                       env={**os.environ, **self.env, mark[0]: mark[1]}, start_new_session=True,
                                       preexec_fn=ctrl_c_as_in_a_terminal)
        run = Run(label, process, time.monotonic(), psutil.Process(process.pid).create_time(), mark)
        self.runs.append(run)
        return run

    def processes(self) -> list[psutil.Process]:
        return [p for run in self.runs for p in run.processes()]

    def parts(self) -> int:
        return len([n for n in os.listdir(self.out) if n.endswith(".parquet")]) if self.out.is_dir() else 0


def last_line(job: Job, run: Run) -> str:
    lines = [line for line in (job.folder / f"{run.label}.err").read_text(errors="replace").splitlines() if line]
    return lines[-1][:300] if lines else "(no output)"


def until(condition, timeout: float, step: float = 0.25):
    """The first true value of `condition()` within `timeout` seconds, else None."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step)


def name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return "(gone)"


def engines(processes: list[psutil.Process]) -> list[psutil.Process]:
    found = []
    for process in processes:
        try:
            if ENGINE_TITLE in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


# --- the faults: each waits for its moment, strikes, and returns what it did ---------------------------------------
@dataclass
class Trial:
    fault: str
    index: int
    rng: random.Random
    job: Job
    moment: float  # seconds after the first run's launch
    timeout: float  # most seconds a run may take
    cluster: object = None
    info: dict = field(default_factory=dict)

    def wait_for_moment(self, run: Run) -> None:
        if until(lambda: not run.alive(), run.started + self.moment - time.monotonic()):
            raise Missed(run, "the fault")

    def struck(self, run: Run) -> float:
        now = time.monotonic()
        parts = self.job.parts()
        self.info.update(fired_s=round(now - run.started, 2), parts_at_fault=parts,
                         phase="generating" if parts else "startup (no part committed yet)")
        return now

    def finish(self, run: Run) -> Run:
        """The run that finished the job: `run` if it did, else the same command run again (as an operator would,
        up to RERUNS times: a loaded machine can fail a run for reasons of its own, e.g. Ray's start-up timing out;
        each such failure is recorded with its last line)."""
        if run.wait(self.timeout) == 0:
            return run
        failures = []
        for _ in range(RERUNS):
            again = self.job.launch()
            if again.wait(self.timeout) == 0:
                if failures:
                    self.info["failed_reruns"] = failures
                return again
            kill_run(again)
            failures.append(f"{again.label} exited {again.record()['exit']}: {last_line(self.job, again)}")
        raise Failed(f"the same command failed {RERUNS} times: {'; '.join(failures)}")


def strike_engine(trial: Trial, run: Run) -> tuple[float, Run]:
    trial.wait_for_moment(run)
    targets = until(lambda: engines(run.processes()) or not run.alive(), trial.timeout, step=0.5)
    if not isinstance(targets, list) or not targets:
        raise Missed(run, "an engine actor was found") if not run.alive() else Failed(
            "no engine actor process appeared")
    trial.info["waited_for_engine_s"] = round(max(0.0, time.monotonic() - run.started - trial.moment), 1)
    targets[0].kill()
    fired = trial.struck(run)
    if run.wait(trial.timeout) != 0:
        raise Failed(f"the run whose engine was killed exited {run.record()['exit']}, not 0 (see run1.err)")
    return fired, run


def kill_run(run: Run) -> list[psutil.Process]:
    """SIGKILL the driver and every process it started (again for any that started meanwhile); the survivors."""
    left = []
    for _ in range(3):
        left = reaper.kill_all(run.processes())
        if not run.processes():
            break
    return left


def strike_driver_kill(trial: Trial, run: Run) -> tuple[float, Run]:
    trial.wait_for_moment(run)
    left = kill_run(run)
    fired = trial.struck(run)
    trial.info["killed_processes"] = "driver and all it started" + (f" ({len(left)} survived)" if left else "")
    return fired, trial.finish(run)


def stop_driver(trial: Trial, run: Run, send) -> float:
    """Signal the driver, wait for it to exit, then for what it started to go (what is still there after 15 s is
    counted as orphans and killed)."""
    trial.wait_for_moment(run)
    send()
    fired = trial.struck(run)
    code = run.wait(120)
    trial.info["exit_after_signal"] = code if code is not None else "still running after 120 s: killed"
    until(lambda: not run.processes(), 15)
    orphans = run.processes()
    trial.info["orphans"] = len(orphans)
    reaper.kill_all(orphans)
    return fired


def strike_driver_term(trial: Trial, run: Run) -> tuple[float, Run]:
    fired = stop_driver(trial, run, lambda: run.process.send_signal(signal.SIGTERM))
    return fired, trial.finish(run)


def strike_driver_int(trial: Trial, run: Run) -> tuple[float, Run]:
    fired = stop_driver(trial, run, lambda: os.killpg(run.process.pid, signal.SIGINT))
    code, started = run.exit, (trial.job.out / "_genfarm" / "job.json").exists()
    summary = trial.job.out / "_summary.json"
    complete = summary.exists() and json.loads(summary.read_text()).get("status") == "complete"
    # Exit 130 once the job runs; an interrupt during Python's own start-up (imports) ends it as Python does, and
    # one that comes as the job completes leaves it complete: exit 0, or Python's own end by SIGINT when it struck
    # the finished run's shutdown.
    if code not in (0, 130) and not (code == -signal.SIGINT and (not started or complete)):
        raise Failed(f"Ctrl-C ended the driver with exit {code}, not 130 (see run1.err)")
    if code == 130 and "run the same command again" not in (trial.job.folder / "run1.err").read_text():
        raise Failed("Ctrl-C: exit 130 without saying to run the same command again (see run1.err)")
    return fired, trial.finish(run)


def strike_temp_files(trial: Trial, run: Run) -> tuple[float, Run]:
    trial.wait_for_moment(run)
    planted = plant(trial.job.out, trial.rng)
    fired = trial.struck(run)
    time.sleep(trial.rng.uniform(0, 3))
    if run.alive():  # a crash right after: the driver and all it started, then what such a crash leaves
        kill_run(run)
        planted += plant(trial.job.out, trial.rng)
    trial.info["planted"] = planted
    return fired, trial.finish(run)


def plant(out: Path, rng: random.Random) -> list[str]:
    """What crashed writes leave: genfarm's atomic writes write OUTPUT/_genfarm/tmp/NAME.<hex> and rename it into
    place, so a crash leaves half of a part or of a JSON file there; other writers leave hidden `.NAME.tmp` files next
    to the data. Half a real part when there is one, else half of a part-shaped file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = out / "_genfarm" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    (out / "_errors").mkdir(exist_ok=True)
    parts = sorted(out.glob("*.parquet"))
    if parts:
        source = rng.choice(parts)
        name, data = source.name, source.read_bytes()
    else:
        name, scratch = f"{uuid.uuid4().hex[:12]}-000000000-{uuid.uuid4().hex[:10]}.parquet", out / "_genfarm" / "x"
        pq.write_table(pa.table({"id": ["r00000", "r00001"], "output_text": ["half", "written"]}), scratch)
        data = scratch.read_bytes()
        scratch.unlink()
    half = data[:max(1, int(len(data) * rng.uniform(0.1, 0.9)))]
    files = {tmp / f"{name}.{uuid.uuid4().hex}": half,
             tmp / f"_summary.json.{uuid.uuid4().hex}": b'{"job_id": "chaos", "status": "compl',
             tmp / f"run.json.{uuid.uuid4().hex}": b'{"run_id": "',
             out / f".{name}.tmp": half,
             out / "_errors" / f".{name}.tmp": half[:len(half) // 2]}
    for path, content in files.items():
        path.write_bytes(content)
    return [str(path.relative_to(out)) for path in files]


def strike_node(trial: Trial, run: Run) -> tuple[float, Run]:
    trial.wait_for_moment(run)
    cluster = trial.cluster
    # The worker node to kill: one that runs an engine now (drawn among them), waiting for one if none does yet.
    busy = until(lambda: [n for n in cluster.workers if engines(n.processes())] or not run.alive(), trial.timeout,
                 step=0.5)
    if not isinstance(busy, list) or not busy:
        raise Missed(run, "an engine ran on a worker node") if not run.alive() else Failed(
            "no engine started on a worker node")
    node = trial.rng.choice(busy)
    victims = node.processes()
    names = sorted({name(p) for p in victims})
    left = reaper.kill_all(victims)
    fired = trial.struck(run)
    trial.info.update(killed_node=node.name, killed_processes=len(victims), killed_names=names,
                      survivors=len(left))
    done = trial.finish(run)
    trial.info["finished_by"] = "the same run" if done is run else "the same command run again"
    return fired, done


STRIKE = {"engine": strike_engine, "driver-kill": strike_driver_kill, "driver-term": strike_driver_term,
          "driver-int": strike_driver_int, "temp-files": strike_temp_files, "node": strike_node}


# --- the local multi-node Ray of the node fault ---------------------------------------------------------------------
@dataclass
class Node:
    name: str
    temp: Path
    session: int
    created: float

    def processes(self) -> list[psutil.Process]:
        return reaper.family(self.session, self.created, (MARK, str(self.temp)))


@dataclass
class Cluster:
    address: str
    env: dict
    head: Node
    workers: list[Node]


@contextmanager
def local_cluster(log: Path, workers: int = 2, cpus: int = 3):
    """A head without CPUs and `workers` worker nodes of `cpus` logical CPUs, each started by `ray start` in a
    session and temp dir of its own (short: Ray's socket paths must stay under 108 bytes), on free ports where Ray
    has fixed defaults; token auth with a token of its own. Everything it started is killed at the end."""
    from genfarm.serve.deploy import free_ports

    base = Path(tempfile.mkdtemp(prefix="gfc", dir="/tmp"))
    port, client, *agents = free_ports(2 + 2 * (workers + 1))
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_worker_niceness": "0"}
    nodes: list[Node] = []

    def start(name: str, args: list[str]) -> Node:
        temp = base / name
        temp.mkdir()
        ports = ["--dashboard-agent-listen-port", str(agents.pop()), "--metrics-export-port", str(agents.pop())]
        with open(log, "a") as out:
            process = subprocess.Popen([RAY, "start", *args, *ports, "--temp-dir", str(temp), "--disable-usage-stats"],
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**os.environ, **env, MARK: str(temp)})
            node = Node(name, temp, process.pid, psutil.Process(process.pid).create_time())
            nodes.append(node)
            if process.wait(timeout=180) != 0:
                raise Failed(f"`ray start` of node {name} failed (see {log})")
        return node

    try:
        head = start("h", ["--head", "--port", str(port), "--ray-client-server-port", str(client), "--num-cpus", "0",
                           "--include-dashboard", "false"])
        address = f"127.0.0.1:{port}"
        started = [start(f"w{i}", ["--address", address, "--num-cpus", str(cpus)]) for i in range(1, workers + 1)]
        yield Cluster(address, {**env, "RAY_ADDRESS": address}, head, started)
    finally:
        for node in nodes[::-1]:
            reaper.stop_all(node.processes())
        shutil.rmtree(base, ignore_errors=True)


# --- checks --------------------------------------------------------------------------------------------------------
def check(job: Job) -> dict:
    """What a reader of the output folder sees, against the input; raises Failed with every problem found."""
    import pandas as pd
    import pyarrow.parquet as pq

    problems = []
    visible = {}
    for folder in (job.out, job.out / "_errors"):
        names = [n for n in os.listdir(folder) if not n.startswith(("_", "."))] if folder.is_dir() else []
        for name in names:
            if not name.endswith(".parquet"):
                problems.append(f"{folder.name}/{name} is visible to readers and not a part")
                continue
            try:
                visible[f"{folder.name}/{name}"] = pq.ParquetFile(folder / name).metadata.num_rows
            except Exception as err:  # noqa: BLE001 - any reason a reader cannot open it
                problems.append(f"{folder.name}/{name} is not a whole Parquet file ({err})")
    if problems:
        raise Failed("; ".join(problems))
    results = list(pd.read_parquet(job.out, columns=["id"])["id"])
    has_errors = any(n.endswith(".parquet") and not n.startswith(("_", ".")) for n in os.listdir(job.out / "_errors")) \
        if (job.out / "_errors").is_dir() else False
    errors = list(pd.read_parquet(job.out / "_errors", columns=["id"])["id"]) if has_errors else []
    done = results + errors
    repeated = len(done) - len(set(done))
    lost = sorted(set(job.ids) - set(done))
    foreign = sorted(set(done) - set(job.ids))
    if repeated or lost or foreign:
        problems.append(f"rows: {repeated} repeated, {len(lost)} lost (e.g. {lost[:3]}), {len(foreign)} not in the "
                        f"input")
    summary = json.loads((job.out / "_summary.json").read_text()) if (job.out / "_summary.json").exists() else {}
    balanced = (summary.get("status") == "complete" and summary.get("input_rows") == job.rows
                and summary.get("completed_rows") == len(results) and summary.get("error_rows") == len(errors))
    if not balanced:
        said = {k: summary.get(k) for k in ("status", "input_rows", "completed_rows", "error_rows")}
        problems.append(f"_summary.json does not balance: {said} against {len(results)} results + {len(errors)} "
                        "errors")
    status = genfarm("status", str(job.out))
    expected = f"{len(results):,} rows generated, {len(errors):,} errors, {len(done):,}/{job.rows:,} done"
    if status.returncode != 0 or expected not in status.stdout or "\ncomplete" not in status.stdout:
        problems.append(f"genfarm status: exit {status.returncode}, said {status.stdout.strip()!r}, expected "
                        f"{expected!r} and complete")
    if results:
        inspect = genfarm("inspect", str(job.out), "--rows", "3")
        if inspect.returncode != 0 or f"first {min(3, len(results))} rows" not in inspect.stdout:
            problems.append(f"genfarm inspect: exit {inspect.returncode}: {inspect.stderr.strip()[-300:]}")
    if problems:
        raise Failed("; ".join(problems))
    return {"results": len(results), "errors": len(errors), "parts": len(visible)}


def genfarm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genfarm", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "1000"})  # one line per line: rich wraps at the width


# --- trials --------------------------------------------------------------------------------------------------------
def run_trial(fault: str, index: int, seed: int, settings: dict, tries: int = 3) -> dict:
    """One trial; a job that ended before its moment came is tried again (at most `tries` times in all) with a moment
    drawn before the time that job ended."""
    rng = random.Random(f"{seed}/{fault}/{index}")  # a trial's draws do not depend on which others run
    lo, hi = settings["window"]
    missed = []
    while True:
        record = attempt(fault, index, rng, rng.uniform(lo, hi), settings)
        if record["status"] != "missed" or len(missed) + 1 >= tries:
            return {**record, "missed_before": missed} if missed else record
        missed.append(record["moment_s"])
        hi = 0.8 * record["ended_s"]
        lo = min(lo, hi / 2)


def attempt(fault: str, index: int, rng: random.Random, moment: float, settings: dict) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"{fault}-{index}-", dir=settings["work"]))
    record = {"fault": fault, "trial": index, "moment_s": round(moment, 2)}
    print(f"{fault} #{index}: fault {moment:.1f} s after launch, in {folder}", flush=True)
    job = None
    with ExitStack() as stack:
        try:
            cluster = stack.enter_context(local_cluster(folder / "cluster.log")) if fault == "node" else None
            job = Job(folder, settings["rows"], settings["model"], cluster.env if cluster else {},
                      workers=2 if cluster else 1)
            trial = Trial(fault, index, rng, job, moment, settings["timeout"], cluster)
            run = job.launch()
            fired, done = STRIKE[fault](trial, run)
            record.update(trial.info, recovery_s=round(done.ended - fired, 1), checks=check(job), status="passed")
        except Missed as missed:
            record.update(status="missed", reason=str(missed), ended_s=missed.ended_s)
        except Failed as failed:
            record.update(status="failed", reason=str(failed))
        except Exception as err:  # noqa: BLE001 - the harness itself broke: keep the evidence too
            record.update(status="failed", reason=f"{type(err).__name__}: {err}")
        finally:
            if job is not None:
                record["runs"] = [run.record() for run in job.runs]
                for run in job.runs:
                    if run.alive():  # the harness broke off: nothing of this trial may run on
                        kill_run(run)
                        run.process.wait()
                until(lambda: not job.processes(), 10, step=0.5)  # a finished run's Ray takes a moment to go
                left = job.processes()
                if left:
                    record["left_running"] = len(left)
                    reaper.kill_all(left)
    if record["status"] == "failed":
        record["folder"] = str(folder)
        print(f"  FAILED: {record['reason']}\n  evidence kept in {folder}", flush=True)
    else:
        print(f"  {record['status']}" + (f": recovered in {record['recovery_s']} s" if "recovery_s" in record
                                         else f": {record['reason']}"), flush=True)
        if not settings["keep"]:
            shutil.rmtree(folder, ignore_errors=True)
    return record


def calibrate(settings: dict) -> dict:
    """A clean run of the same job: how long it takes, and when its first part is committed."""
    folder = Path(tempfile.mkdtemp(prefix="clean-", dir=settings["work"]))
    job = Job(folder, settings["rows"], settings["model"])
    run = job.launch()
    first = until(lambda: job.parts() or not run.alive(), settings["timeout"])
    first_s = time.monotonic() - run.started if first and run.alive() else None
    if run.wait(settings["timeout"]) != 0:
        raise SystemExit(f"error: a clean run of the job failed ({run.record()}); see {folder}")
    check(job)
    seconds = run.ended - run.started
    if not settings["keep"]:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"clean run: {seconds:.1f} s (first part committed after {first_s or 0:.1f} s)", flush=True)
    return {"seconds": round(seconds, 1), "first_part_s": round(first_s, 1) if first_s else None}


def resolve_model(name: str | None, work: Path) -> tuple[str, str]:
    """(model.name for the job file, its description): the default model, the test suite's tiny model, or any name,
    folder or hub id genfarm resolves."""
    from genfarm import models

    if name == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        import tiny_model

        return str(tiny_model.build(work / "tiny-model")), "tiny (tests/tiny_model.py: random weights)"
    name = name or models.DEFAULT_MODEL
    return name, name


def summarize(trials: list[dict]) -> list[dict]:
    table = []
    for (fault,), group in results_files.by_key(trials, "fault").items():
        recovered = [t["recovery_s"] for t in group if t["status"] == "passed"]
        table.append({
            "fault": fault, "trials": len(group),
            **{status: sum(t["status"] == status for t in group) for status in ("passed", "failed", "missed")},
            "mid_generation": sum(t.get("parts_at_fault", 0) > 0 for t in group),
            "failed_reruns": sum(len(t.get("failed_reruns", [])) for t in group),
            "median_recovery_s": round(statistics.median(recovered), 1) if recovered else None,
            "max_recovery_s": max(recovered) if recovered else None,
        })
    return table


WHAT = {"engine": "SIGKILL engine actor; same run finishes",
        "driver-kill": "SIGKILL driver + its processes; same command again",
        "driver-term": "SIGTERM driver; same command again",
        "driver-int": "SIGINT driver's process group (Ctrl-C); exit 130, same command again",
        "temp-files": "crashed-write leftovers planted, then SIGKILL driver + its processes; same command again",
        "node": "SIGKILL every process of a worker node running an engine (local 3-node Ray); job or re-run finishes"}


def write_results(meta: dict, table: list[dict], trials: list[dict], out: Path, quiet: bool = False) -> None:
    def num(value) -> str:
        return "" if value is None else f"{value:.1f}"

    window = meta["window_s"]
    clean = meta.get("clean_run")
    lines = [f"Measured {meta['date']} on {meta['machine']}; model {meta['model']}; {meta['rows']} rows per job "
             f"(article task, 48 tokens a row, batches of 8, one engine; node: two engines on a head and two worker "
             f"nodes); seed {meta['seed']}; {meta['trials']} trial(s) per fault planned, {meta['trials_run']} "
             f"trials run. Fault moments uniform over {window[0]:.1f}-{window[1]:.1f} s after launch"
             + (f" (a clean run took {clean['seconds']} s)" if clean else "") + ".", "",
             "Recovery: from the fault to the end of the run that finished the job (the same run, or the same "
             "command run again). Passed: every input row exactly once in results + errors, only whole parts visible, "
             "_summary.json balanced, `genfarm status` complete with the same counts, `genfarm inspect` works. "
             "Mid-generation: faults that struck after the first part was committed (the others hit start-up). "
             "driver-term and driver-int recoveries include waiting (at most 15 s) for the stopped run's processes "
             "to go before the command is run again.", "",
             "| fault | what | trials | passed | failed | missed | mid-generation | failed re-runs "
             "| median recovery s | max recovery s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['fault']} | {WHAT[r['fault']]} | {r['trials']} | {r['passed']} | {r['failed']} | "
                     f"{r['missed']} | {r['mid_generation']} | {r['failed_reruns']} | "
                     f"{num(r['median_recovery_s'])} | {num(r['max_recovery_s'])} |")
    reruns = [(t, line) for t in trials for line in t.get("failed_reruns", [])]
    if reruns:
        lines += ["", "Re-runs that failed before one finished the job (their time is in the recovery):"]
        lines += [f"- {t['fault']} #{t['trial']}: {line}" for t, line in reruns]
    failed = [t for t in trials if t["status"] == "failed"]
    if failed:
        lines += ["", "Failed trials (folders kept):"]
        lines += [f"- {t['fault']} #{t['trial']}: {t['reason']} ({t.get('folder')})" for t in failed]
    if "node" not in meta["faults"]:
        lines += ["", "The node fault (optional) was not run here."]
    results_files.write("chaos", {"meta": meta, "results": table, "trials": trials}, lines, folder=out, quiet=quiet)


def parse_window(text: str) -> tuple[float, float]:
    lo, hi = (float(x) for x in text.split(","))
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError("want LO,HI seconds with 0 <= LO <= HI")
    return lo, hi


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10, help="Trials of each fault (default 10).")
    parser.add_argument("--faults", default=",".join(DEFAULT_FAULTS),
                        help=f"Comma-separated faults, of {', '.join(FAULTS)} (default: all but node, which is "
                        "optional).")
    parser.add_argument("--rows", type=int, default=400, help="Input rows of each job (default 400).")
    parser.add_argument("--seed", type=int, help="Seed of the fault moments and choices (default: a random one, "
                        "printed and recorded; give it again to draw the same moments).")
    parser.add_argument("--model", help="Model of the jobs: a genfarm model name, folder or hub id; 'tiny' builds the "
                        "test suite's tiny random-weight model (default: genfarm's default model).")
    parser.add_argument("--out", type=Path, default=results_files.RESULTS,
                        help="Folder for chaos.json and chaos.md (default benchmarks/results).")
    parser.add_argument("--work", type=Path, help="Folder for the trials' job folders (default: a new folder under "
                        "/tmp); a failed trial's folder is always kept.")
    parser.add_argument("--window", type=parse_window, help="LO,HI: draw fault moments from LO-HI seconds after "
                        "launch instead of measuring a clean run first.")
    parser.add_argument("--timeout", type=float, default=600, help="Most seconds one run may take (default 600).")
    parser.add_argument("--keep", action="store_true", help="Keep every trial's folder, not only failed ones.")
    args = parser.parse_args(argv)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown or not faults:
        parser.error(f"unknown fault(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(FAULTS)}")
    seed = args.seed if args.seed is not None else secrets.randbelow(10**6)
    work = args.work or Path(tempfile.mkdtemp(prefix="gf-chaos-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    model, described = resolve_model(args.model, work)
    print(f"seed {seed}; model {described}; {args.rows} rows; trials in {work}", flush=True)
    settings = {"rows": args.rows, "model": model, "work": str(work), "timeout": args.timeout, "keep": args.keep}
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
            "model": described, "rows": args.rows, "seed": seed, "trials": args.trials, "faults": faults}
    if args.window:
        settings["window"] = args.window
    else:
        clean = calibrate(settings)
        meta["clean_run"] = clean
        settings["window"] = (0.1 * clean["seconds"], 0.85 * clean["seconds"])
    meta["window_s"] = [round(x, 1) for x in settings["window"]]
    # Round by round, every fault in each, with the results written after every trial: a run stopped early (a
    # deadline, Ctrl-C) still leaves results that cover every fault.
    trials = []
    planned = len(faults) * args.trials
    for index in range(1, args.trials + 1):
        for fault in faults:
            trials.append(run_trial(fault, index, seed, settings))
            meta["trials_run"] = f"{len(trials)} of {planned}"
            write_results(meta, summarize(trials), trials, args.out, quiet=len(trials) < planned)
    failed = [t for t in trials if t["status"] == "failed"]
    print(f"seed {seed}: {len(failed)} failed trial(s)" + (f", evidence in {', '.join(t['folder'] for t in failed)}"
                                                             if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
