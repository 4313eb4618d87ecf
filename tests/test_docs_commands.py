"""Every shell command and curl line of README.md and docs/*.md runs as written, or is listed in NOT_RUNNABLE.

What counts as a command: each line of a fenced block marked bash, sh, shell or console (`$ ` lines only in console
blocks), continuation lines (`\\`) joined, `# ...` comments stripped. A command that appears in several places runs
once. The test fails when a documented command is neither run here nor listed in NOT_RUNNABLE (with its reason), when
a NOT_RUNNABLE entry, a check or a stand-in below names a command the docs no longer have, and when a command runs or
its output is not what the docs promise.

How they run, as a reader would run them:
- From a fresh shell: `bash -c` with this machine's environment minus any activated venv (no VIRTUAL_ENV, no
  .venv/bin on PATH) and minus settings that would point genfarm elsewhere (RAY_ADDRESS, GENFARM_CLUSTER,
  GENFARM_API_KEYS). After a document's own `source .venv/bin/activate`, its later commands run after that line.
- In a temporary work folder holding copies of the repo's jobs/, examples/ and docs/ next to a `.venv` link to the
  repo's venv, so results (`out/...`) land there and not in the repo. `scripts/demo` cds to the repo itself: it runs
  there, as written, with no bounding flags (on a quiet 2-core machine it takes about 2 minutes); results it leaves
  (`out/articles`, `out/translate`) are removed after, and any the user had there are put back.
- Files a command names as the user's own (`my_topics.parquet`, `ref.txt`, `hyp.txt`) are written by the test first.
- `genfarm run jobs/*.yaml` runs with the job file's settings plus bounding flags the test appends after the
  command's own arguments, because a whole run takes minutes: only `--set input.limit=N` and
  `--set sampling.max_tokens=N` (BOUNDS; never a field the command sets itself), with the job's own output path,
  which is relative and so under the work folder. Results are checked: the Parquet results read with pandas, as many
  rows as the job's summary says it completed, every input row accounted for.
- The curl lines, `genfarm serve status` and the `jobs`/`cluster` commands run against one local `genfarm serve`
  started with the README's own command on the README's port 8000 (the test fails at once, naming the process, if
  something else holds that port); the `status`/`scale`/`shutdown`/`jobs`/`cluster` commands reach it through
  `$GENFARM_CLUSTER` set to the address it prints, as the README says. curl gets a config file (CURL_HOME) that only
  adds the HTTP status after each answer, so each answer is checked for 200 and its body's shape.
- A synopsis (`[--json]`, `OUTPUT`) runs as the concrete commands in STANDS_FOR.
Each other `genfarm serve` command starts its own service, checked and stopped with SIGTERM (exit 0, port free).

Time on a quiet 2-core machine, about 8 minutes: the demo ~2 (its `scripts/setup` re-installs genfarm into .venv,
idempotent), the bounded jobs and the other batch commands ~3, three local services ~3. Two runs of this file at once
(or anything else on port 8000) make the second fail at once on the port.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
import pandas as pd
import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VENV = ROOT / ".venv"
ACTIVATE = "source .venv/bin/activate"
PORT = 8000  # the README's
COMMAND_TIMEOUT_S = 900  # one command; generous, since a loaded machine is many times slower than a quiet one
SERVE_START_S = 600

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

# Documented commands (or prefixes of them) this test does not run, and why. Each must still be in the docs.
NOT_RUNNABLE = {
    "scripts/test": "the whole test suite, this file included (CI runs it through .ci/run)",
    ".venv/bin/python -m benchmarks.": "the benchmarks take ~25 min (batch), ~6 min (serve) and 200,000 rows "
                                       "(driver_memory), and rewrite the measured results committed in "
                                       "benchmarks/results/",
    "cluster/local-cluster.sh start 2 2": "a head and two worker nodes on the fixed ports 6380/8265, which a shared "
                                          "machine's other Ray may hold; tests/test_local_cluster.py runs this "
                                          "script (start, submit, follow, cluster status, stop) on free ports",
    "cluster/local-cluster.sh stop": "stops the local-cluster.sh cluster (see its start above)",
    "genfarm submit jobs/articles.yaml --address http://127.0.0.1:8265 --set output.path=/shared/out/articles":
        "needs the local-cluster.sh cluster and storage all its nodes share (/shared is a placeholder); "
        "tests/test_local_cluster.py and tests/test_submit.py submit jobs to real heads",
    "genfarm jobs status raysubmit_XXXX": "a placeholder job id (tests/test_submit.py follows a real one)",
    "genfarm jobs logs raysubmit_XXXX": "a placeholder job id (tests/test_submit.py reads a real one's logs)",
    "genfarm jobs stop raysubmit_XXXX": "a placeholder job id",
    "genfarm serve examples/serve.yaml --address http://HEAD:8265": "a placeholder address (HEAD): a remote cluster",
    "genfarm serve examples/serve.yaml --address http://127.0.0.1:8265": "deploys to the local-cluster.sh cluster "
                                                                         "(its fixed dashboard port 8265)",
}

# A synopsis in the docs runs as these concrete commands.
STANDS_FOR = {
    "genfarm serve status": "genfarm serve status [--json]",
    "genfarm serve status --json": "genfarm serve status [--json]",
    "genfarm cluster status": "genfarm cluster status [--json]",
    "genfarm cluster status --json": "genfarm cluster status [--json]",
    "genfarm eval out/translate-references --references examples/references --allow-missing --json":
        "genfarm eval OUTPUT --references FILE_OR_FOLDER [--allow-missing] [--json]",
}

BOUNDED = ["--set", "input.limit=2", "--set", "sampling.max_tokens=32"]
# Bounding flags appended to a documented `genfarm run jobs/*.yaml` (BOUNDED unless named here).
BOUNDS = {
    # every row: `genfarm eval` below scores all 15 references and refuses missing translations
    "genfarm run jobs/translate-references.yaml": ["--set", "sampling.max_tokens=32"],
}
BOUNDING_FIELDS = {"input.limit", "sampling.max_tokens"}
JOB_RUN = re.compile(r"^genfarm run (jobs/[\w.-]+\.yaml)(\s|$)")


# ---------------------------------------------------------------------------------------------- the docs' commands

@dataclass(frozen=True)
class Documented:
    where: str  # file:line
    command: str
    activated: bool  # after the document's own `source .venv/bin/activate`


def _strip_comment(line: str) -> str:
    """The line without a `# ...` comment (a # that starts a word outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def documented(files: list[Path] = DOC_FILES) -> list[Documented]:
    found = []
    for path in files:
        activated = False
        lines = path.read_text().splitlines()
        block, pending = None, ""
        for number, line in enumerate(lines, 1):
            fence = re.match(r"^\s*```(\w*)", line)
            if fence:
                block = None if block is not None else fence.group(1)
                pending = ""
                continue
            if block not in ("bash", "sh", "shell", "console"):
                continue
            if block == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            line = f"{pending} {line.strip()}" if pending else line
            if line.rstrip().endswith("\\"):
                pending = line.rstrip()[:-1].rstrip()
                continue
            pending = ""
            command = _strip_comment(line).strip()
            if command:
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                found.append(Documented(f"{where}:{number}", command, activated))
                activated = activated or command in (ACTIVATE, ". .venv/bin/activate")
    return found


def occurrences(command: str) -> list[Documented]:
    wanted = STANDS_FOR.get(command, command)
    return [d for d in documented() if d.command == wanted]


def is_activated(command: str) -> bool:
    return any(d.activated for d in occurrences(command))


# ---------------------------------------------------------------------------------------------- running them

@dataclass
class Ran:
    command: str
    returncode: int
    stdout: str
    stderr: str
    cwd: Path

    def __str__(self) -> str:
        return (f"`{self.command}` (in {self.cwd}) exited {self.returncode}\n--- stdout\n{self.stdout[-3000:]}"
                f"\n--- stderr\n{self.stderr[-3000:]}")


def fresh_env(**extra: str) -> dict[str, str]:
    """This machine's environment as a new shell has it: no activated venv, nothing pointing genfarm elsewhere."""
    venv_bins = {(VENV / "bin").resolve(), *([Path(os.environ["VIRTUAL_ENV"], "bin").resolve()]
                                             if os.environ.get("VIRTUAL_ENV") else [])}
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "BASH_ENV", "ENV", "RAY_ADDRESS",
                        "GENFARM_CLUSTER", "GENFARM_API_KEYS", "CURL_HOME")}
    env["PATH"] = os.pathsep.join(p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                                  if p and Path(p).resolve() not in venv_bins)
    return {**env, **extra}


def shell_script(command: str, activated: bool) -> str:
    return f"{ACTIVATE}\n{command}" if activated else command


def run(command: str, cwd: Path, extra_args: list[str] = (), env: dict | None = None,
        timeout: float = COMMAND_TIMEOUT_S) -> Ran:
    line = command + "".join(f" {shlex.quote(a)}" for a in extra_args)
    done = subprocess.run(["bash", "-c", shell_script(line, is_activated(command))], cwd=cwd,
                          env=env or fresh_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    return Ran(line, done.returncode, done.stdout, done.stderr, cwd)


# ---------------------------------------------------------------------------------------------- checks

Check = Callable[[Ran], None]


def succeeds(*texts: str) -> Check:
    def check(r: Ran) -> None:
        assert r.returncode == 0, str(r)
        for text in texts:
            assert text in r.stdout, f"{text!r} not in the output of {r}"
    return check


def one_line_error(code: int, text: str) -> Check:
    def check(r: Ran) -> None:
        lines = r.stderr.strip().splitlines()
        assert r.returncode == code and "Traceback" not in r.stderr, str(r)
        assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], str(r)
    return check


def json_output(check_body: Callable[[object], None]) -> Check:
    def check(r: Ran) -> None:
        assert r.returncode == 0, str(r)
        try:
            body = json.loads(r.stdout)
        except ValueError as error:
            raise AssertionError(f"not JSON ({error}): {r}") from None
        check_body(body)
    return check


def output_of(command: str, cwd: Path) -> Path:
    """A `genfarm run JOB [--set ...]` command's output folder: the job file's, or its --set output.path."""
    args = shlex.split(command)
    path = yaml.safe_load((cwd / args[2]).read_text())["output"]["path"]
    for i, arg in enumerate(args):
        if arg == "--set" and args[i + 1].startswith("output.path="):
            path = args[i + 1].split("=", 1)[1]
    return cwd / path


def job_results(r: Ran) -> None:
    """A finished job: its summary accounts for every input row, and pandas reads as many results as it says."""
    assert r.returncode == 0, str(r)
    out = output_of(r.command, r.cwd)
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["status"] == "complete", summary
    assert summary["input_rows"] == summary["completed_rows"] + summary["error_rows"] > 0, summary
    results = pd.read_parquet(out)
    assert len(results) == summary["samples"] >= summary["completed_rows"], (len(results), summary)
    assert {"id", "output_text", "finish_reason", "completion_tokens"} <= set(results.columns), results.columns


def documents(r: Ran) -> None:
    job_results(r)
    docs = pd.read_parquet(output_of(r.command, r.cwd) / "_documents")
    assert sorted(docs["target_language"]) == ["de", "es", "fr"], docs
    assert set(docs["status"]) <= {"complete", "partial"} and docs["text"].str.len().min() > 0, docs


def eval_scores(body) -> None:
    assert sorted(c["target_language"] for c in body["corpus"]) == ["de", "es", "fr"], body
    assert all(0 <= c["chrf"] <= 100 and c["documents"] == 15 for c in body["corpus"]), body


def sacrebleu_scores(body) -> None:
    assert [m["name"] for m in body] == ["BLEU", "chrF2"] and all(0 <= m["score"] <= 100 for m in body), body


def write_my_topics(work: Path) -> None:
    topics = pd.read_json(work / "examples" / "topics.jsonl", lines=True).head(2)
    topics.to_parquet(work / "my_topics.parquet", index=False)


def write_ref_and_hyp(work: Path) -> None:
    """ref.txt: the German references; hyp.txt: the references job's German translations, line for line."""
    refs = pd.read_json(work / "examples" / "references" / "en-de.jsonl", lines=True)
    got = pd.read_parquet(work / "out" / "translate-references" / "_documents")
    got = got[got["target_language"] == "de"].set_index("document_id")["text"]
    hyps = [" ".join(str(got.get(i, "")).split()) for i in refs["id"]]
    (work / "ref.txt").write_text("".join(f"{' '.join(r.split())}\n" for r in refs["reference"]))
    (work / "hyp.txt").write_text("".join(f"{h}\n" for h in hyps))


# Commands run in the work folder, in the docs' order; `genfarm run jobs/*.yaml` not named here gets job_results.
IN_WORK: dict[str, Check] = {
    ACTIVATE: succeeds(),
    "genfarm run jobs/articles.yaml": job_results,
    "genfarm run jobs/articles.yaml --set input.path=my_topics.parquet --set output.path=out/mine": job_results,
    "genfarm status out/articles": succeeds("2 rows generated, 0 errors", "complete"),
    # the bounded run has no timeout rows: the documented answer to that is a one-line error, exit 2
    "genfarm retry-errors out/articles --type timeout": one_line_error(2, "no error rows of type timeout"),
    "genfarm inspect out/articles --rows 5": succeeds("topic-000", "topic-001"),
    'genfarm generate "Write a haiku about Parquet" --temperature 0': succeeds(),
    "genfarm models list": succeeds("smollm2-135m", "prepared"),  # the table cuts the name at 80 columns
    "genfarm --help": succeeds("run", "status", "inspect", "eval", "generate", "submit", "serve"),
    "genfarm run jobs/translate-docs.yaml": documents,
    "genfarm status out/translate-docs": succeeds("documents: 3 (", "complete"),
    ".venv/bin/python -c \"import pandas; print(pandas.read_parquet('out/translate-docs/_documents'))\"":
        succeeds("getting-started"),
    "genfarm run jobs/translate-references.yaml": job_results,
    "genfarm eval out/translate-references --references examples/references": succeeds("chrF", "BLEU", "de", "fr",
                                                                                        "es"),
    "genfarm eval out/translate-references --references examples/references --allow-missing --json":
        json_output(eval_scores),
    "sacrebleu ref.txt -i hyp.txt -m bleu chrf": json_output(sacrebleu_scores),
}
# What a command needs written into the work folder first.
PREPARE: dict[str, Callable[[Path], None]] = {
    "genfarm run jobs/articles.yaml --set input.path=my_topics.parquet --set output.path=out/mine": write_my_topics,
    "sacrebleu ref.txt -i hyp.txt -m bleu chrf": write_ref_and_hyp,
}
# Commands run in the repo root, where scripts/demo works and leaves its results.
IN_REPO: dict[str, Check] = {
    "scripts/demo": succeeds("topic-000"),
    ".venv/bin/python -c \"import pandas; print(pandas.read_parquet('out/articles')[['id', 'title', "
    "'output_text']])\"": succeeds("topic-000", "output_text"),
}
DEMO_OUTPUTS = ("out/articles", "out/translate")


# ---------------------------------------------------------------------------------------------- the service

def holder(port: int) -> str | None:
    """Who listens on `port`, if anyone."""
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
            if conn.pid is None:
                return "a process this user cannot see"
            try:
                return f"pid {conn.pid} ({' '.join(psutil.Process(conn.pid).cmdline())[:120]})"
            except psutil.Error:
                return f"pid {conn.pid}"
    try:
        with socket.create_server(("127.0.0.1", port)):
            return None
    except OSError as error:
        return f"an unknown process ({error})"


class Service:
    """A documented `genfarm serve ...` command running in the foreground, as a user starts it in a terminal."""

    def __init__(self, command: str, work: Path, port: int, log: Path):
        self.command, self.work, self.port, self.log = command, work, port, log
        taken = holder(port)
        if taken:
            pytest.fail(f"port {port} is taken by {taken}: `{command}` serves on it (the README's port); stop that "
                        "process and run this test again")
        self.started = time.monotonic()
        with log.open("w") as output:
            self.proc = subprocess.Popen(["bash", "-c", shell_script(command, is_activated(command))], cwd=work,
                                         env=fresh_env(), stdin=subprocess.DEVNULL, stdout=output,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + SERVE_START_S
        while "Ctrl-C stops" not in (text := log.read_text()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"`{command}` did not come up in {SERVE_START_S}s (exit {self.proc.returncode}):\n"
                            f"{text[-3000:]}")
            time.sleep(1)
        self.start_s = time.monotonic() - self.started
        self.address = re.search(r"--address (http://\S+)", text).group(1)
        self.url = f"http://127.0.0.1:{port}"

    def front(self) -> psutil.Process | None:
        """The `genfarm serve` process itself (bash may have exec'd it or run it as its child)."""
        try:
            shell = psutil.Process(self.proc.pid)
            for process in [shell, *shell.children()]:
                if any(Path(arg).name == "genfarm" for arg in process.cmdline()[:2]):
                    return process
        except psutil.Error:
            pass
        return None

    def stop(self) -> float:
        """SIGTERM to the command, as `kill PID` does: it exits 0 and frees its port. Returns the seconds it took."""
        front = self.front()
        assert front, f"`{self.command}` is not running:\n{self.log.read_text()[-3000:]}"
        started = time.monotonic()
        front.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"`{self.command}` still running 180 s after SIGTERM") from None
        seconds = time.monotonic() - started
        assert code == 0, f"`{self.command}` exited {code} on SIGTERM:\n{self.log.read_text()[-3000:]}"
        deadline = time.monotonic() + 10
        while (taken := holder(self.port)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not taken, f"port {self.port} still held by {taken} after `{self.command}` stopped"
        return seconds

    def kill(self) -> None:
        """Last resort, for this test's own processes only: its shell's process group."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=30)


def answers(r: Ran) -> list[tuple[int, str]]:
    """(HTTP status, body) of each transfer of a curl command run with the test's curl config."""
    assert r.returncode == 0, str(r)
    parts = re.split(r"\n@@HTTP (\d{3})@@\n", r.stdout)
    return [(int(status), body) for body, status in zip(parts[0::2], parts[1::2])]


def sse_events(body: str) -> list:
    events = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", body
    return [json.loads(e) for e in events[:-1]]


def check_models(bodies: list[str]) -> None:
    models = json.loads(bodies[0])
    assert models["object"] == "list" and models["data"][0]["id"] == "smollm2-135m-instruct", models


def check_chat(bodies: list[str]) -> None:
    chat = json.loads(bodies[0])
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant", chat
    assert chat["choices"][0]["message"]["content"] and 0 < chat["usage"]["completion_tokens"] <= 50, chat


def check_stream(bodies: list[str]) -> None:
    chunks = sse_events(bodies[0])
    assert len(chunks) > 1 and all(c["object"] == "text_completion" for c in chunks), chunks
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]), chunks


def check_article(bodies: list[str]) -> None:
    article = json.loads(bodies[0])
    assert {"title", "body", "text", "usage"} <= set(article) and article["text"], article
    assert 0 < article["usage"]["completion_tokens"] <= 300, article


def check_translation(bodies: list[str]) -> None:
    translation = json.loads(bodies[0])
    assert translation["target_language"] == "fr" and translation["text"] and translation["segments"] == 1, \
        translation


def check_health_and_metrics(bodies: list[str]) -> None:
    assert json.loads(bodies[0])["status"] == "ok", bodies[0]
    assert "# TYPE genfarm_" in bodies[1] and "genfarm_requests_total" in bodies[1], bodies[1][:2000]


# A curl line's check, by the routes it calls (in order): each route a documented curl line calls needs one.
CURL_CHECKS: dict[tuple[str, ...], Callable[[list[str]], None]] = {
    ("/v1/models",): check_models,
    ("/v1/chat/completions",): check_chat,
    ("/v1/completions",): check_stream,
    ("/v1/articles",): check_article,
    ("/v1/translations",): check_translation,
    ("/health", "/metrics"): check_health_and_metrics,
}


def routes(command: str) -> tuple[str, ...]:
    return tuple(re.findall(r"localhost:\d+(/[\w/.-]*)", command))


# Run against the README's `genfarm serve` after the curl lines, in this order ($GENFARM_CLUSTER = its address).
def serve_status(body) -> None:
    assert body["status"] == "RUNNING" and [r["state"] for r in body["replicas"]] == ["RUNNING"], body


def cluster_status(body) -> None:
    assert [n["state"] for n in body["nodes"]] == ["ALIVE"] and body["nodes"][0]["serve_replicas"] == 1, body


ON_SERVICE: dict[str, Check] = {
    "genfarm serve status": succeeds("genfarm: RUNNING", "RUNNING"),
    "genfarm serve status --json": json_output(serve_status),
    "genfarm jobs list": succeeds("job id"),
    "genfarm cluster status": succeeds("ALIVE"),
    "genfarm cluster status --json": json_output(cluster_status),
    "genfarm serve scale --replicas 3": succeeds('scaling genfarm: {"num_replicas": 3}'),
    "genfarm serve shutdown": succeeds("genfarm is shutting down"),
}
# Documented commands that start a service of their own (the first one is the module's service).
STARTS = {
    "genfarm serve": PORT,
    "GENFARM_API_KEYS=key1,key2 genfarm serve": PORT,
    "genfarm serve examples/serve.yaml --port 8001 --set replicas.count=2": 8001,
}


# ---------------------------------------------------------------------------------------------- coverage

def runs(command: str) -> bool:
    """Whether this test runs `command` (a documented one, or the synopsis some concrete commands stand for)."""
    ran = {*IN_WORK, *IN_REPO, *ON_SERVICE, *STARTS}
    return (command in ran or command in {STANDS_FOR[c] for c in ran if c in STANDS_FOR}
            or bool(JOB_RUN.match(command)) or (command.startswith("curl ") and routes(command) in CURL_CHECKS))


def listed(command: str) -> bool:
    return any(command.startswith(entry) for entry in NOT_RUNNABLE)


def coverage_problems(found: list[Documented]) -> list[str]:
    commands = list(dict.fromkeys(d.command for d in found))
    problems = []
    for command in commands:
        where = ", ".join(d.where for d in found if d.command == command)
        if runs(command) and listed(command):
            problems.append(f"{where}: `{command}` is both run and listed in NOT_RUNNABLE")
        elif not runs(command) and not listed(command):
            hint = (f"add a check for the routes {routes(command)} to CURL_CHECKS" if command.startswith("curl ")
                    else "run it (IN_WORK, ON_SERVICE, ...) or list it in NOT_RUNNABLE with the reason")
            problems.append(f"{where}: `{command}` is neither run nor listed: {hint}")
        if len({d.activated for d in found if d.command == command}) > 1:
            problems.append(f"{where}: `{command}` follows `{ACTIVATE}` in one place but not another: a reader "
                            "without it gets another command; activate the venv in each document that needs it")
    for entry in NOT_RUNNABLE:
        if not any(c.startswith(entry) for c in commands):
            problems.append(f"NOT_RUNNABLE lists `{entry}`, which no document has any more: remove it")
    ran = [*IN_WORK, *IN_REPO, *ON_SERVICE, *STARTS, *PREPARE, *BOUNDS]
    for command in ran:
        if STANDS_FOR.get(command, command) not in commands:
            problems.append(f"the test runs `{command}`, which no document has any more: remove or update it")
    for command, flags in [*BOUNDS.items(), *((c, BOUNDED) for c in commands if JOB_RUN.match(c))]:
        fields = {f.split("=")[0] for f in flags[1::2]}
        own = {a.split("=")[0] for a in shlex.split(command)[3:] if "=" in a}
        if flags[0::2] != ["--set"] * len(fields) or not fields <= BOUNDING_FIELDS or fields & own:
            problems.append(f"bounding flags {flags} for `{command}`: only --set {' / '.join(BOUNDING_FIELDS)}, "
                            "never a field the command sets itself")
    return problems


def test_every_documented_command_is_run_or_listed():
    found = documented()
    assert len({d.command for d in found}) > 30, found  # the extraction works
    problems = coverage_problems(found)
    assert not problems, "\n".join(problems)


def test_a_new_or_changed_command_fails_the_check(tmp_path):
    """What a docs edit does to the check: a new command, a changed one, a removed one, a lost activation."""
    readme = (ROOT / "README.md").read_text()
    docs = [tmp_path / "README.md", tmp_path / "translation.md"]
    docs[1].write_text((ROOT / "docs" / "translation.md").read_text().replace(f"{ACTIVATE} ", "echo "))
    edits = {
        "a new command": ("genfarm models list", "genfarm models list\ngenfarm models prepare --all  # new"),
        "a changed curl line": ("curl localhost:8000/v1/models", "curl localhost:8000/v1/modelz"),
        "a listed command removed": ("genfarm jobs stop raysubmit_XXXX", "genfarm jobs list"),
    }
    expected = {
        "a new command": "`genfarm models prepare --all` is neither run nor listed",
        "a changed curl line": "`curl localhost:8000/v1/modelz` is neither run nor listed: add a check",
        "a listed command removed": "NOT_RUNNABLE lists `genfarm jobs stop raysubmit_XXXX`, which no document has",
    }
    for name, (old, new) in edits.items():
        assert readme.count(old) == 1, old
        docs[0].write_text(readme.replace(old, new))
        problems = "\n".join(coverage_problems(documented(docs)))
        assert expected[name] in problems, (name, problems)
        assert "follows `source .venv/bin/activate` in one place but not another" in problems  # translation.md's


# ---------------------------------------------------------------------------------------------- the runs

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A temporary copy of what the docs' commands read, next to a link to the repo's venv."""
    assert (VENV / "bin" / "genfarm").exists(), f"no {VENV}: run scripts/setup"
    folder = tmp_path_factory.mktemp("docs-commands")
    for name in ("jobs", "examples", "docs"):
        shutil.copytree(ROOT / name, folder / name)
    (folder / ".venv").symlink_to(VENV)
    return folder


def in_docs_order(commands: dict) -> list[str]:
    order = {c: i for i, c in reversed(list(enumerate(d.command for d in documented())))}
    return sorted(commands, key=lambda c: order.get(STANDS_FOR.get(c, c), len(order)))


def test_two_commands_demo_in_the_repo():
    """`scripts/demo` as written (no bounding flags), then the README's pandas line in the folder it leaves."""
    kept = ROOT / "out" / f".kept-by-test-docs-commands-{os.getpid()}"
    existed = (ROOT / "out").exists()
    moved = []
    for name in DEMO_OUTPUTS:
        if (ROOT / name).exists():
            kept.mkdir(parents=True, exist_ok=True)
            shutil.move(ROOT / name, kept / Path(name).name)
            moved.append(name)
    try:
        for command in in_docs_order(IN_REPO):
            IN_REPO[command](run(command, ROOT, timeout=1800))
        for name in DEMO_OUTPUTS:
            job_results(Ran(f"genfarm run jobs/{Path(name).name}.yaml", 0, "", "", ROOT))
    finally:
        for name in DEMO_OUTPUTS:
            shutil.rmtree(ROOT / name, ignore_errors=True)
        for name in moved:
            shutil.move(kept / Path(name).name, ROOT / name)
        if kept.exists():
            kept.rmdir()
        if not existed:
            shutil.rmtree(ROOT / "out", ignore_errors=True)


def test_batch_commands_in_the_docs_order(work):
    """Every command IN_WORK and every documented `genfarm run jobs/*.yaml`, one after another as a reader goes."""
    failures = []
    for command in in_docs_order({**IN_WORK, **{d.command: job_results for d in documented()
                                                if JOB_RUN.match(d.command)}}):
        result = None
        try:
            if command in PREPARE:
                PREPARE[command](work)
            extra = BOUNDS.get(command, BOUNDED) if JOB_RUN.match(command) else []
            result = run(command, work, extra)
            IN_WORK.get(command, job_results)(result)
        except Exception as error:  # noqa: BLE001 - every command's failure is reported, and the next ones still run
            failures.append(f"`{command}`: {type(error).__name__}: {error}"
                            + (f"\n{result}" if result and str(result) not in str(error) else ""))
    assert not failures, "\n\n".join(failures)


@pytest.fixture(scope="module")
def service(work):
    """The README's `genfarm serve`, on the README's port, for the curl lines and the commands that operate it."""
    service = Service("genfarm serve", work, PORT, work / "serve.log")
    yield service
    service.kill()


@pytest.mark.parametrize("command", [c for c in dict.fromkeys(d.command for d in documented())
                                     if c.startswith("curl ") and routes(c) in CURL_CHECKS])
def test_curl_line(service, work, tmp_path, command):
    (tmp_path / ".curlrc").write_text('write-out = "\\n@@HTTP %{http_code}@@\\n"\nsilent\nshow-error\n')
    got = answers(run(command, work, env=fresh_env(CURL_HOME=str(tmp_path)), timeout=300))
    assert [status for status, _ in got] == [200] * len(routes(command)), got
    CURL_CHECKS[routes(command)]([body for _, body in got])


def test_operating_the_service(service, work):
    """status, jobs, cluster status, then scale and shutdown; then the README's stop (kill: SIGTERM)."""
    env = fresh_env(GENFARM_CLUSTER=service.address)
    try:
        for command in ON_SERVICE:
            ON_SERVICE[command](run(command, work, env=env, timeout=300))
            if command == "genfarm serve scale --replicas 3":
                state = json.loads(run("genfarm serve status --json", work, env=env).stdout)
                assert state["target"] == {"num_replicas": 3}, state
        deadline = time.monotonic() + 120  # shutdown may answer while Serve still deletes the app
        while (gone := run("genfarm serve status --json", work, env=env)).returncode == 0 and \
                json.loads(gone.stdout)["status"] == "DELETING" and time.monotonic() < deadline:
            time.sleep(2)
        assert gone.returncode == 2 and "is not deployed" in gone.stderr, str(gone)
        seconds = service.stop()
        print(f"`genfarm serve` came up in {service.start_s:.0f}s, stopped in {seconds:.1f}s after SIGTERM")
    finally:
        service.kill()  # the port is the next test's


def test_serve_with_api_keys(work):
    service = Service("GENFARM_API_KEYS=key1,key2 genfarm serve", work, PORT, work / "serve-keys.log")
    try:
        refused = httpx.get(f"{service.url}/v1/models", timeout=60)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key", refused.text
        wrong = httpx.get(f"{service.url}/v1/models", headers={"Authorization": "Bearer key3"}, timeout=60)
        assert wrong.status_code == 401, wrong.text
        for key in ("key1", "key2"):
            allowed = httpx.get(f"{service.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=60)
            assert allowed.status_code == 200, allowed.text
        assert httpx.get(f"{service.url}/health", timeout=60).status_code == 200  # open to all
        service.stop()
    finally:
        service.kill()


def test_serve_config_on_another_port_with_two_replicas(work):
    command = "genfarm serve examples/serve.yaml --port 8001 --set replicas.count=2"
    service = Service(command, work, STARTS[command], work / "serve-8001.log")
    try:
        models = httpx.get(f"{service.url}/v1/models", timeout=60)
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "smollm2-135m-instruct", models.text
        state = run("genfarm serve status --json", work, env=fresh_env(GENFARM_CLUSTER=service.address))
        replicas = json.loads(state.stdout)["replicas"]
        assert [r["state"] for r in replicas] == ["RUNNING", "RUNNING"], state.stdout
        service.stop()
    finally:
        service.kill()
