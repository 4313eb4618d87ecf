"""Remote submission through Ray's Jobs API to a real Ray head (its own processes, dashboard and ports), then
following the job and the cluster with genfarm's commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import topics, write_jsonl

BIN = Path(sys.executable).parent
ADDRESS = "http://127.0.0.1:8267"


def genfarm(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genfarm", *map(str, args), "--address", ADDRESS],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_AUTH_MODE": "disabled"})


@pytest.fixture(scope="module")
def head():
    temp = tempfile.mkdtemp(prefix="gfh", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    # The job's entrypoint runs `genfarm`; token auth is off for this loopback-only test head (a real cluster
    # keeps it on and its operators hold the token: see the README's operator section).
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([BIN / "ray", "start", "--head", "--port", "6392", "--dashboard-port", "8267",
                             "--dashboard-host", "127.0.0.1", "--num-cpus", "3", "--temp-dir", temp,
                             # the test session's own Ray holds the default agent ports
                             "--dashboard-agent-listen-port", "52391", "--dashboard-agent-grpc-port", "52392",
                             "--runtime-env-agent-port", "52393", "--metrics-export-port", "52394",
                             "--disable-usage-stats", "--block"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 120
    while True:
        try:
            JobSubmissionClient(ADDRESS).list_jobs()
            break
        except Exception:
            if time.monotonic() > deadline:
                proc.terminate()
                raise
            time.sleep(1)
    yield ADDRESS
    proc.terminate()
    proc.wait(timeout=60)
    shutil.rmtree(temp, ignore_errors=True)


def test_submit_follow_and_see_the_cluster(tmp_path, tiny, head):
    data = write_jsonl(tmp_path / "data" / "t.jsonl", topics(12))
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {{path: {data}, id_column: id}}\ntask: {{type: article}}\nmodel: {{name: {tiny}}}\n"
                   "engine: {max_model_len: 512, kv_cache_gib: 0.25}\nsampling: {max_tokens: 8}\n"
                   f"output: {{path: {out}}}\n")
    submitted = genfarm("submit", job)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split()[1]
    deadline = time.monotonic() + 300
    while (status := genfarm("jobs", "status", job_id).stdout.strip()) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, "job did not finish"
        time.sleep(2)
    logs = genfarm("jobs", "logs", job_id).stdout
    assert status == "SUCCEEDED", logs
    assert "complete: 12 of 12 rows generated" in logs
    assert len(pd.read_parquet(out)) == 12
    assert job_id in genfarm("jobs", "list").stdout
    cluster = json.loads(genfarm("cluster", "status", "--json").stdout)
    assert cluster["nodes"][0]["cpus"] == 3 and cluster["nodes"][0]["head"]


def test_submit_refuses_a_relative_output_and_a_missing_cluster(tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", topics(2))
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {{path: {data}}}\ntask: {{type: article}}\noutput: {{path: out/rel}}\n")
    result = genfarm("submit", job)
    assert result.returncode == 2 and "output.path: out/rel is relative" in result.stderr
    gone = subprocess.run([sys.executable, "-m", "genfarm", "jobs", "list", "--address", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=120)
    assert gone.returncode == 2 and "no Ray dashboard answers at http://127.0.0.1:9" in gone.stderr


def test_the_package_carries_the_files_the_job_reads(tmp_path, monkeypatch):
    """A policy file the task reads and a glob over folders reach the cluster: the job folder there has only what
    genfarm ships."""
    from genfarm.cluster import package_job
    from genfarm.errors import UserError

    monkeypatch.chdir(tmp_path)
    for name in ("a/part.jsonl", "b/part.jsonl"):
        (tmp_path / "data" / name).parent.mkdir(parents=True)
        write_jsonl(tmp_path / "data" / name, [{"id": name, "message": "Where is my order?"}])
    (tmp_path / "policy.md").write_text("Refunds within 30 days.\nNo promises about delivery dates.\n")
    (tmp_path / "job.yaml").write_text("input: {path: 'data/**/*.jsonl', id_column: id}\n"
                                       "task: {type: reply, policy: policy.md}\noutput: {path: /shared/out}\n")
    folder, _ = package_job("job.yaml", [])
    monkeypatch.chdir(folder)
    from genfarm.batch.source import list_inputs
    from genfarm.spec import load_job

    shipped = load_job("job.yaml", [])
    assert shipped.task.policy.startswith("Refunds within 30 days.")
    assert sorted(f.name for f in list_inputs(shipped.input)[1]) == ["a/part.jsonl", "b/part.jsonl"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_text("input: {path: 'nothing/*.jsonl'}\ntask: {type: article}\n"
                                       "output: {path: /shared/out}\n")
    with pytest.raises(UserError, match="input.path: no files match"):
        package_job("job.yaml", [])
