"""Jobs survive what kills other batch tools: a dead engine actor, a killed driver, Ctrl-C. Every input row ends
up exactly once in results + errors. Real processes are killed with real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_job, topics, write_jsonl

from genfarm.batch.job import plan_job, record_pass, run_job, start_ray
from genfarm.batch.ledger import Ledger
from genfarm.batch.progress import JobProgress


def engine_actor_pids() -> list[int]:
    """Engine actors of this test process's own Ray (its raylet's workers), not of any other job on the machine."""
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "GenerateWorker" in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


def wait_for(condition, timeout: float = 180, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def committed_parts(output: Path) -> list[str]:
    return [p for p in os.listdir(output) if p.endswith(".parquet")] if output.exists() else []


def ctrl_c_as_in_a_terminal() -> None:
    """A shell without job control starts background commands (`cmd &`) with SIGINT ignored, and their children
    inherit that (Python then installs no KeyboardInterrupt handler): the driver gets Ctrl-C as from a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def committed_rows(output: Path) -> int:
    """Result rows committed so far (a finished job merges its parts, so parts are no measure of progress)."""
    return Ledger(str(output)).count().completed


def assert_exactly_once(output: Path, ids: list[str]) -> None:
    done = list(pd.read_parquet(output)["id"])
    if (output / "_errors").exists():
        done += list(pd.read_parquet(output / "_errors")["id"])
    assert sorted(done) == sorted(ids)  # no row lost, none repeated


def test_engine_actor_killed_mid_job(tmp_path, tiny, ray_session):
    rows = topics(480)  # enough that the job still runs when its engine is killed, on a quiet machine too
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out"
    job = make_job(data, out, tiny, sampling={"max_tokens": 48}, workers={"batch_size": 8})
    result = {}
    runner = threading.Thread(target=lambda: result.update(run_job(job, show_progress=False)))
    runner.start()
    wait_for(lambda: len(committed_parts(out)) >= 2, what="two committed parts")
    pids = engine_actor_pids()
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    rows_at_kill = committed_rows(out)
    runner.join(timeout=600)
    assert not runner.is_alive()
    assert rows_at_kill < committed_rows(out)  # the kill happened mid-job
    assert result["status"] == "complete" and result["error_rows"] == 0
    assert_exactly_once(out, [r["id"] for r in rows])


def test_rows_that_fail_every_try_are_recorded_as_engine_errors(tmp_path, tiny, ray_session):
    data = write_jsonl(tmp_path / "t.jsonl", topics(7))
    job = make_job(data, tmp_path / "out", tiny)
    plan = plan_job(job, restart=False, job_file="")
    start_ray(job)
    with JobProgress(plan.total, 0, enabled=False) as progress:
        record_pass(plan, progress)  # what the last pass does with rows no engine could finish
    errors = pd.read_parquet(tmp_path / "out" / "_errors")
    assert sorted(errors["id"]) == [f"t{i:03d}" for i in range(7)]
    assert (errors["error_type"] == "engine_error").all()
    assert errors["message"].str.contains("workers.max_retries").all()


def cli_job(tmp_path, tiny, n_rows: int):
    rows = topics(n_rows)
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {{path: {data}, id_column: id}}\ntask: {{type: article}}\nmodel: {{name: {tiny}}}\n"
                   "engine: {max_model_len: 512, kv_cache_gib: 0.25}\nsampling: {max_tokens: 48}\n"
                   f"workers: {{batch_size: 8}}\noutput: {{path: {tmp_path / 'out'}}}\n")
    command = [sys.executable, "-m", "genfarm", "run", str(job), "--no-progress", "--json"]
    return rows, command


@pytest.mark.parametrize("how", ["kill -9", "ctrl-c"])
def test_driver_stopped_mid_job_then_same_command_finishes(tmp_path, tiny, how):
    # Enough rows that the job still runs when it is stopped: a quiet machine generated 200 of them in 3 s
    rows, command = cli_job(tmp_path, tiny, 800)
    out = tmp_path / "out"
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=ctrl_c_as_in_a_terminal)
    wait_for(lambda: len(committed_parts(out)) >= 2 or driver.poll() is not None, what="two committed parts")
    assert driver.poll() is None, "the job ended before it could be stopped"
    driver.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGINT)
    _, stderr = driver.communicate(timeout=120)
    if how == "ctrl-c":
        assert driver.returncode == 130 and "run the same command again" in stderr
    else:
        assert driver.returncode == -signal.SIGKILL
    kept = committed_rows(out)
    assert len(committed_parts(out)) >= 2
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert committed_rows(out) > kept
    assert_exactly_once(out, [r["id"] for r in rows])


def test_retry_errors_generates_error_rows_again(tmp_path, tiny, ray_session):
    data = write_jsonl(tmp_path / "t.jsonl", topics(7) + [{"id": "bad"}])
    out = tmp_path / "out"
    job = make_job(data, out, tiny)
    plan = plan_job(job, restart=False, job_file="")
    start_ray(job)
    with JobProgress(plan.total, 0, enabled=False) as progress:
        record_pass(plan, progress)  # as if every engine had died on every row
    result = subprocess.run([sys.executable, "-m", "genfarm", "retry-errors", str(out), "--type", "engine_error",
                             "--no-progress"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    results = pd.read_parquet(out)
    assert sorted(results["id"]) == [f"t{i:03d}" for i in range(7)]
    errors = pd.read_parquet(out / "_errors")
    assert list(errors["id"]) == ["bad"] and list(errors["error_type"]) == ["missing_field"]
    assert_exactly_once(out, [f"t{i:03d}" for i in range(7)] + ["bad"])
    retried = [p for p in os.listdir(out / "_genfarm") if p.startswith("retried-")]
    assert len(retried) == 1  # the old error rows are kept aside, not deleted
    nothing = subprocess.run([sys.executable, "-m", "genfarm", "retry-errors", str(out), "--type", "timeout"],
                             capture_output=True, text=True, timeout=120)
    assert nothing.returncode == 2 and "no error rows of type timeout" in nothing.stderr
