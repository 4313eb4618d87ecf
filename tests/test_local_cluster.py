"""cluster/local-cluster.sh as an operator runs it, from a shell with no activated venv: start a head and two worker
nodes, `genfarm submit` a job and follow it to SUCCEEDED, rows generated on both workers, `genfarm cluster status`,
and `stop`, which leaves no process of this cluster and every other Ray on the machine running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import topics, write_jsonl

from genfarm.serve.deploy import free_ports

SCRIPT = Path(__file__).parents[1] / "cluster" / "local-cluster.sh"
GENFARM = Path(sys.executable).parent / "genfarm"  # called by its path, as from a shell that did not activate .venv
JOB_TIMEOUT_S = 150
ROWS = 32

pytestmark = pytest.mark.timeout(JOB_TIMEOUT_S + 150)


def processes(base: Path, sessions: set[int] = frozenset()) -> dict[int, str]:
    """Live processes that name `base` on their command line (Ray's daemons of the cluster) or belong to one of
    `sessions`: pid -> session id and command line. Zombies are left out (this machine's init does not reap)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue  # not a process, or gone
        state, _ppid, _pgrp, sid = stat.rpartition(")")[2].split()[:4]
        if state != "Z" and (str(base) in cmdline or int(sid) in sessions):
            found[int(proc.name)] = f"session {sid}: {cmdline[:120]}"
    return found


def test_start_submit_follow_status_stop(tmp_path, tmp_path_factory, tiny, ray_session):
    base = tmp_path_factory.mktemp("lc")  # short: Ray's socket paths under it must stay below 108 bytes
    gcs_port, dashboard_port = free_ports(2)
    address = f"http://127.0.0.1:{dashboard_port}"
    env = {"HOME": str(Path.home()), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",  # no venv on PATH
           "GENFARM_HEAD_PORT": str(gcs_port), "GENFARM_DASHBOARD_PORT": str(dashboard_port),
           "GENFARM_CLUSTER_DIR": str(base),
           # Rows flow once both engines are up (the head passes this to the job's driver): on a loaded 2-core
           # machine one engine can start so much later that the other has taken a small job's every row.
           "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": str(JOB_TIMEOUT_S)}

    def run(*args, timeout=120) -> subprocess.CompletedProcess:
        return subprocess.run(list(map(str, args)), capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=timeout)

    def genfarm(*args) -> subprocess.CompletedProcess:
        return run(GENFARM, *args, "--address", address)

    # 8 input files of 4 rows: 8 blocks to hand out, each long enough to generate (48 tokens a row) that the blocks
    # queue up and both engines get some; with a few tokens an engine can finish each block before the next is read
    for shard in range(8):
        write_jsonl(tmp_path / "in" / f"t{shard}.jsonl", topics(ROWS)[shard::8])
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    # Engines reserve 2 CPUs: one fits each worker node, none the 1-CPU head.
    job.write_text(f"input: {{path: {tmp_path / 'in'}, id_column: id}}\ntask: {{type: article}}\n"
                   f"model: {{name: {tiny}}}\n"
                   "engine: {max_model_len: 512, kv_cache_gib: 0.25, cpus_per_worker: 2, cpu_threads: 1}\n"
                   "sampling: {max_tokens: 48}\nworkers: {count: 2, batch_size: 2}\n"
                   f"output: {{path: {out}}}\n")
    try:
        started = run("bash", SCRIPT, "start", 2, 2, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"GENFARM_CLUSTER=http://127.0.0.1:{dashboard_port}" in started.stdout  # it says how to use it
        again = run("bash", SCRIPT, "start", 2, 2)
        assert again.returncode == 1 and again.stderr.count("\n") == 1, again.stderr
        assert f"a cluster is already running under {base}" in again.stderr

        submitted = genfarm("submit", job)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.split()[1]
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while (status := genfarm("jobs", "status", job_id).stdout.strip()) not in ("SUCCEEDED", "FAILED", "STOPPED"):
            assert time.monotonic() < deadline, f"job still {status} after {JOB_TIMEOUT_S} s"
            time.sleep(2)
        logs = genfarm("jobs", "logs", job_id).stdout
        assert status == "SUCCEEDED", logs[-4000:]
        assert f"complete: {ROWS} of {ROWS} rows generated" in logs

        cluster = json.loads(genfarm("cluster", "status", "--json").stdout)
        assert len(cluster["nodes"]) == 3 and sum(node["head"] for node in cluster["nodes"]) == 1
        workers = {node["node_id"] for node in cluster["nodes"] if not node["head"]}
        results = pd.read_parquet(out)
        assert len(results) == ROWS
        assert set(results["node_id"]) == workers  # rows from both worker nodes, none from the head
        assert results["worker_id"].nunique() == 2  # by one engine each

        ours = processes(base)
        sessions = {int(line.split()[1].rstrip(":")) for line in ours.values()}
        assert len(sessions) == 3 and os.getsid(0) not in sessions, ours  # a session per node, not the caller's
    finally:
        stopped = run("bash", SCRIPT, "stop")
    assert stopped.returncode == 0 and f"stopped the cluster under {base}" in stopped.stdout, stopped.stderr
    assert processes(base, sessions) == {}
    # the test session's own Ray (started before the cluster, not by the script) still runs tasks
    assert ray_session.get(ray_session.remote(lambda: "alive").remote(), timeout=60) == "alive"
