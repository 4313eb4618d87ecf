"""A real multi-node Ray cluster whose nodes are really apart: each worker node runs in a Linux network namespace of
its own (netns.py), with its own address on a bridge and its own /tmp, and reaches the head (on the host side of the
bridge, `ray start --head --node-ip-address 198.18.X.1`) only over that network. Input and output are on an
S3-compatible server on the bridge (test_object_storage.py), as a real cluster's would be: no node shares a disk or a
loopback address with another. Engine actors spread over the worker nodes, a node added while a job runs gets an engine
and rows, a node removed while a job runs loses no row. The node_id and worker_id (engine actor) columns of the output
show where each row was generated."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from conftest import make_job, topics
from netns import Network, network, unavailable
from test_failures import wait_for
from test_object_storage import S3Server, committed_ids, jsonl, s3_server

from genfarm.batch.ledger import Ledger

HELPER = Path(__file__).parent / "multinode_job.py"
HELPER_TIMEOUT_S = 300  # the helper gives up on a stuck job after 240 s; this only catches a helper that hangs
RAY = str(Path(sys.executable).parent / "ray")
WORKER_NODES = 2  # at most, at the start of a test; one namespace more is kept for a node that joins mid-job

pytestmark = pytest.mark.timeout(HELPER_TIMEOUT_S + 120)


@pytest.fixture(scope="module")
def apart(tmp_path_factory, tiny) -> Iterator[tuple[Network, S3Server, str]]:
    """The network (namespaces for the worker nodes), the S3 server on its bridge, and the tiny model outside /tmp
    (each worker node has a /tmp of its own; the model is where a node image would carry it)."""
    reason = unavailable()
    if reason:
        pytest.skip(f"worker nodes need network namespaces: {reason}")
    with ExitStack() as stack:
        net = stack.enter_context(network(WORKER_NODES + 1))
        s3 = stack.enter_context(s3_server(net.host_ip, tmp_path_factory.mktemp("moto") / "moto.log"))
        models = tempfile.mkdtemp(prefix="genfarm-netns-model-", dir="/var/tmp")
        stack.callback(shutil.rmtree, models, ignore_errors=True)
        model = shutil.copytree(tiny, Path(models) / "tiny")
        yield net, s3, str(model)


def free_port(host: str) -> int:
    with socket.create_server((host, 0)) as sock:
        return sock.getsockname()[1]


def kill_session(sid: int, grace_s: float = 5) -> None:
    """SIGTERM every process of session `sid` (the head's `ray start` and all it started), SIGKILL what is left."""
    def members() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and os.getsid(int(entry.name)) == sid:
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        for pid in members():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while members() and time.monotonic() < deadline:
            time.sleep(0.2)


@contextmanager
def ray_head(net: Network, cpus: int, env: dict, folder: Path, dashboard: int | None) -> Iterator[str]:
    """A Ray head on the host side of the bridge, on free ports where Ray has fixed defaults (other Rays on this
    machine use them), with a dashboard on port `dashboard` or none; stopped with everything it started."""
    host = net.host_ip
    temp = tempfile.mkdtemp(prefix="gfh", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    port = free_port(host)
    shown = (["--dashboard-host", host, "--dashboard-port", str(dashboard)] if dashboard
             else ["--include-dashboard", "false"])
    argv = [RAY, "start", "--head", "--block", "--node-ip-address", host, "--port", str(port), "--num-cpus", str(cpus),
            *shown, "--ray-client-server-port", str(free_port(host)), "--dashboard-agent-listen-port",
            str(free_port(host)), "--metrics-export-port", str(free_port(host)), "--temp-dir", temp,
            "--disable-usage-stats"]
    with open(folder / "head.log", "ab") as log:
        head = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # `ray start --block` says so once the head's node is up and registered, not just its GCS port open.
        wait_for(lambda: "will now block forever" in (folder / "head.log").read_text() or head.poll() is not None,
                 timeout=120, what="the Ray head")
        assert head.poll() is None and _listens(host, port), (folder / "head.log").read_text()[-3000:]
        yield f"{host}:{port}"
    finally:
        kill_session(head.pid)
        shutil.rmtree(temp, ignore_errors=True)


def _listens(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def worker_command(head: str, address: str, cpus: int) -> list[str]:
    return [RAY, "start", "--address", head, "--node-ip-address", address, "--num-cpus", str(cpus), "--block",
            "--disable-usage-stats"]


def run_on_cluster(apart, job, layout: dict, folder: Path) -> dict:
    """Run `job` on a fresh cluster: a head with `head_cpus`, worker nodes of `nodes` CPUs each in their own
    namespaces (started by the helper, multinode_job.py, which drives the job and the change). Returns what the
    helper printed."""
    net, s3, _ = apart
    # Every node gets the cluster's token and the object store's credentials from its environment, as on a cluster.
    env = {**s3.env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    dashboard = free_port(net.host_ip) if layout.get("dashboard") else None
    with ray_head(net, layout["head_cpus"], env, folder, dashboard) as head:
        try:
            cpus = [*layout["nodes"], layout["nodes"][-1]]  # a node that joins is shaped like the last one
            described = {**layout, "head": head, "dashboard": dashboard and f"http://{net.host_ip}:{dashboard}",
                         "node_command": {net.node_ip(i): worker_command(head, net.node_ip(i), n)
                                          for i, n in enumerate(cpus)},
                         "logs": str(folder), "network": {"tag": net.tag, "subnet": str(net.subnet),
                                                          "size": net.size, "namespaces": net.namespaces}}
            helper = subprocess.Popen([sys.executable, str(HELPER), job.model_dump_json(), json.dumps(described)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      start_new_session=True)
            try:
                stdout, stderr = helper.communicate(timeout=HELPER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(helper.pid, signal.SIGKILL)
                stdout, stderr = helper.communicate()
                pytest.fail(f"the multi-node job did not finish in {HELPER_TIMEOUT_S} s; helper stderr:\n"
                            f"{stderr[-4000:]}")
        finally:
            for index in range(net.size):
                net.kill(index)  # the worker nodes: every process in their namespaces
    assert helper.returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


def cluster_job(apart, name: str, n_rows: int, shards: int = 1, **sections):
    """A job slow enough to still run when the cluster changes: one engine thread, 64-token outputs, reading
    s3://bucket/NAME/in/*.jsonl (`shards` files: one read task and block each, so the work comes in units an engine
    that joins late can still be given) and writing s3://bucket/NAME/out."""
    _, s3, model = apart
    rows = topics(n_rows)
    for shard in range(shards):
        s3.put(f"{name}/in/t{shard:02d}.jsonl", jsonl(rows[shard::shards]))
    engine = {"cpu_threads": 1, **sections.pop("engine", {})}
    sampling = {"max_tokens": 64, **sections.pop("sampling", {})}
    return make_job(f"s3://bucket/{name}/in/*.jsonl", f"s3://bucket/{name}/out", model, engine=engine,
                    sampling=sampling, **sections)


def assert_every_row_once(apart, result: dict, job):
    """Every input row exactly once in results + errors on the object store; the results' node and worker ids."""
    _, s3, _ = apart
    total = result["summary"]["input_rows"]
    assert result["summary"]["status"] == "complete"
    assert (result["summary"]["completed_rows"], result["summary"]["error_rows"]) == (total, 0)
    out = s3.uri(job.output.path.removeprefix("s3://bucket/"))
    assert sorted(committed_ids(out)) == sorted(f"t{i:03d}" for i in range(total))  # no row lost, none repeated
    assert len(set(result["worker_addresses"])) == len(result["worker_addresses"])  # nodes apart: own addresses
    return Ledger(out).read(columns=["id", "node_id", "worker_id"]).to_pandas()


def test_rows_are_generated_on_both_worker_nodes(apart, tmp_path):
    job = cluster_job(apart, "both", 400, workers={"count": 2, "batch_size": 8}, sampling={"max_tokens": 48})
    # Like a real head, the head has no CPU for engines. The test is about placement, not start-up races: rows
    # flow once both engines are up.
    result = run_on_cluster(apart, job, {"head_cpus": 0, "nodes": [2, 2], "wait_for_engines": True,
                                         "dashboard": True}, tmp_path)
    results = assert_every_row_once(apart, result, job)
    assert sorted(results["node_id"].unique()) == sorted(result["worker_nodes"])  # both worker nodes, the head none
    # What `genfarm submit` tells someone who sends a local output.path to this cluster; an s3:// one is fine.
    local, remote = result["submit_warnings"]
    assert "/data/out is a local path, and the cluster has 3 nodes" in local and "object storage" in local
    assert remote is None


def test_node_added_mid_job_gets_an_engine_and_rows(apart, tmp_path):
    # Engines reserve 2 CPUs: the one worker node fits one engine, the 1-CPU head only read tasks, so a second
    # engine (workers.max) can only start on the node added while the job runs. A new engine takes ~15 s to start
    # here while the first one generates (slower still when engines run at nice 0 beside it): 8 sequences at a time
    # and 64 input files keep work queued well beyond that (1280 rows left it none in one run of two).
    job = cluster_job(apart, "added", 2560, shards=64, engine={"cpus_per_worker": 2, "max_num_seqs": 8},
                      sampling={"max_tokens": 128}, workers={"count": None, "min": 1, "max": 2, "batch_size": 8})
    result = run_on_cluster(apart, job, {"head_cpus": 1, "nodes": [2], "change": "add", "after_parts": 2}, tmp_path)
    change = result["change"]
    assert change["job_running"]
    results = assert_every_row_once(apart, result, job)
    on_new = results[results["node_id"] == change["node"]]
    assert len(on_new) > 0, "the node added mid-job generated no rows (no engine actor was started on it)"
    # ... by an engine actor of its own (worker_id is the actor id), not one that moved there
    assert set(on_new["worker_id"]).isdisjoint(results.loc[results["node_id"] != change["node"], "worker_id"])
    assert sorted(results["node_id"].unique()) == sorted([*result["worker_nodes"], change["node"]])


def test_node_removed_mid_job_loses_no_row(apart, tmp_path):
    # Two worker nodes with one engine each; the second is removed (every process in its namespace killed) once it
    # has committed work, and the job must finish on the remaining node with every row exactly once.
    job = cluster_job(apart, "removed", 320, shards=16, engine={"cpus_per_worker": 2},
                      workers={"count": 2, "batch_size": 8})
    result = run_on_cluster(apart, job, {"head_cpus": 1, "nodes": [2, 2], "change": "remove", "after_parts": 1},
                            tmp_path)
    change = result["change"]
    assert change["job_running"]
    results = assert_every_row_once(apart, result, job)
    assert change["node"] in set(results["node_id"])  # it really generated rows before it went away
    assert Ledger(apart[1].uri("removed/out")).count().completed > change["rows_before"]  # and the job went on after
