"""A real multi-node Ray cluster (a head and worker nodes, on this one machine; see multinode_job.py): engine actors
spread over the worker nodes, a node added while a job runs gets an engine and rows, a node removed while a job runs
loses no row. The node_id and worker_id (engine actor) columns of the output show where each row was generated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_job, topics, write_jsonl
from test_failures import assert_exactly_once, committed_parts

HELPER = Path(__file__).parent / "multinode_job.py"
HELPER_TIMEOUT_S = 300  # the helper gives up on a stuck job after 240 s; this only catches a helper that hangs

pytestmark = pytest.mark.timeout(HELPER_TIMEOUT_S + 60)


def run_on_cluster(job, layout: dict) -> dict:
    """Run `job` on a fresh cluster of `layout` (see multinode_job.py) and return what the helper printed."""
    helper = subprocess.Popen([sys.executable, str(HELPER), job.model_dump_json(), json.dumps(layout)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = helper.communicate(timeout=HELPER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(helper.pid, signal.SIGKILL)  # the helper and the Ray processes of its cluster (its own session)
        stdout, stderr = helper.communicate()
        pytest.fail(f"the multi-node job did not finish in {HELPER_TIMEOUT_S} s; helper stderr:\n{stderr[-4000:]}")
    assert helper.returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


def cluster_job(tmp_path, tiny, n_rows: int, shards: int = 1, **sections):
    """A job slow enough to still run when the cluster changes: one engine thread, 64-token outputs. With shards,
    the input is a folder of that many files: one read task and block each, so the work comes in units an engine
    that joins late can still be given (one file gives only ~2 blocks per cluster CPU, each a whole task)."""
    rows = topics(n_rows)
    for shard in range(shards):
        data = write_jsonl(tmp_path / "in" / f"t{shard:02d}.jsonl", rows[shard::shards])
    data = data.parent if shards > 1 else data
    engine = {"cpu_threads": 1, **sections.pop("engine", {})}
    sampling = {"max_tokens": 64, **sections.pop("sampling", {})}
    return make_job(data, tmp_path / "out", tiny, engine=engine, sampling=sampling, **sections)


def assert_every_row_once(result: dict, job) -> pd.DataFrame:
    total = result["summary"]["input_rows"]
    assert result["summary"]["status"] == "complete"
    assert (result["summary"]["completed_rows"], result["summary"]["error_rows"]) == (total, 0)
    assert_exactly_once(Path(job.output.path), [f"t{i:03d}" for i in range(total)])
    return pd.read_parquet(job.output.path)


def test_rows_are_generated_on_both_worker_nodes(tmp_path, tiny):
    job = cluster_job(tmp_path, tiny, 400, workers={"count": 2, "batch_size": 8}, sampling={"max_tokens": 48})
    # Like a real head, the head has no CPU for engines. The test is about placement, not start-up races: rows
    # flow once both engines are up.
    result = run_on_cluster(job, {"head_cpus": 0, "nodes": [2, 2], "wait_for_engines": True})
    results = assert_every_row_once(result, job)
    assert sorted(results["node_id"].unique()) == sorted(result["worker_nodes"])  # both worker nodes, the head none


def test_node_added_mid_job_gets_an_engine_and_rows(tmp_path, tiny):
    # Engines reserve 2 CPUs: the one worker node fits one engine, the 1-CPU head only read tasks, so a second
    # engine (workers.max) can only start on the node added while the job runs. A new engine takes ~15 s to start
    # here while the first one generates (slower still when engines run at nice 0 beside it): 8 sequences at a time
    # and 64 input files keep work queued well beyond that (1280 rows left it none in one run of two).
    job = cluster_job(tmp_path, tiny, 2560, shards=64, engine={"cpus_per_worker": 2, "max_num_seqs": 8},
                      sampling={"max_tokens": 128}, workers={"count": None, "min": 1, "max": 2, "batch_size": 8})
    result = run_on_cluster(job, {"head_cpus": 1, "nodes": [2], "change": "add", "after_parts": 2})
    change = result["change"]
    assert change["job_running"]
    results = assert_every_row_once(result, job)
    on_new = results[results["node_id"] == change["node"]]
    assert len(on_new) > 0, "the node added mid-job generated no rows (no engine actor was started on it)"
    # ... by an engine actor of its own (worker_id is the actor id), not one that moved there
    assert set(on_new["worker_id"]).isdisjoint(results.loc[results["node_id"] != change["node"], "worker_id"])
    assert sorted(results["node_id"].unique()) == sorted([*result["worker_nodes"], change["node"]])


def test_node_removed_mid_job_loses_no_row(tmp_path, tiny):
    # Two worker nodes with one engine each; the second is removed (raylet and all its processes killed) once it has
    # committed work, and the job must finish on the remaining node with every row exactly once.
    job = cluster_job(tmp_path, tiny, 320, shards=16, engine={"cpus_per_worker": 2},
                      workers={"count": 2, "batch_size": 8})
    result = run_on_cluster(job, {"head_cpus": 1, "nodes": [2, 2], "change": "remove", "after_parts": 1})
    change = result["change"]
    assert change["job_running"]
    results = assert_every_row_once(result, job)
    assert change["node"] in set(results["node_id"])  # it really generated rows before it went away
    assert len(committed_parts(Path(job.output.path))) > change["parts_before"]  # and the job went on after
