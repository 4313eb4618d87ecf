"""Helper process for test_multinode: the driver of one genfarm job on a Ray cluster whose worker nodes live in
network namespaces of their own (see netns.py; the test starts the head on the host side of the bridge and the first
worker nodes), and, while the job runs, one worker node added (started in a spare namespace) or removed (every process
in its namespace killed). What the test needs is printed as one JSON line. Runs in its own process because a process
can belong to one Ray cluster only, and the test session already has one.

Usage: multinode_job.py JOB_JSON LAYOUT_JSON, LAYOUT = {"head": "IP:PORT", "network": netns.Network's fields,
"nodes": [cpus of each worker node started by the test], "node_command": {"IP": argv of `ray start` for the node of
that address}, "change": null | "add" | "remove", "after_parts": committed parts to wait for before the change,
"wait_for_engines": bool}. The job's input and output are on object storage (credentials in the environment).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import ray
from netns import Network
from test_failures import wait_for

from genfarm.batch.job import run_job
from genfarm.batch.ledger import Ledger
from genfarm.cluster import local_output_warning
from genfarm.spec import JobSpec

JOB_TIMEOUT_S = 240  # below the test's subprocess timeout, so a stuck job ends here with a traceback, not a kill


def parts_by(store: Ledger, node_id: str | None) -> int:
    """Committed result parts, all of them or only those an engine on `node_id` wrote."""
    if node_id is None:
        return len(store.parts())
    return sum(pq.read_table(part, columns=["node_id"], filesystem=store.fs).column("node_id")[0].as_py() == node_id
               for part in store.parts())


def alive_nodes() -> dict[str, str]:
    """Node address -> node id of every live node."""
    return {node["NodeManagerAddress"]: node["NodeID"] for node in ray.nodes() if node["Alive"]}


def change_cluster(net: Network, layout: dict, workers: dict[str, str], store: Ledger, running) -> dict:
    """Add a worker node once the job has committed `after_parts` parts, or remove the last worker node once its
    engine has committed that many: synchronised on progress, not time, so the change lands mid-job."""
    last = list(workers)[-1]
    watched = workers[last] if layout["change"] == "remove" else None
    wait_for(lambda: parts_by(store, watched) >= layout["after_parts"] or running.done(), timeout=JOB_TIMEOUT_S,
             what=f"{layout['after_parts']} committed parts" + (f" from node {watched}" if watched else ""))
    if running.done():
        running.result()  # re-raise the job's own error, if any
        raise SystemExit("the job finished before the cluster changed: give it more rows or longer outputs")
    parts_before = len(store.parts())
    if layout["change"] == "add":
        index = len(workers)  # the spare namespace: one more than the nodes the test started
        address = net.node_ip(index)
        with open(os.devnull, "wb") as quiet:
            net.popen(index, layout["node_command"][address], private_tmp=True, stdout=quiet, stderr=quiet)
        node = wait_for(lambda: alive_nodes().get(address), timeout=120, what=f"the node at {address} to join")
    else:
        address, node = last, workers[last]
        net.kill(list(workers).index(last))  # its raylet and every process on it, like a machine that is lost
    return {"kind": layout["change"], "node": node, "address": address, "parts_before": parts_before,
            "job_running": not running.done()}


def main(job: JobSpec, layout: dict) -> dict:
    net = Network(**{**layout["network"], "subnet": ipaddress.ip_network(layout["network"]["subnet"])})
    addresses = [net.node_ip(index) for index in range(len(layout["nodes"]))]
    ray.init(address=layout["head"], _node_ip_address=net.host_ip, log_to_driver=False,
             logging_level=logging.WARNING)
    try:
        workers = wait_for(lambda: (nodes := alive_nodes()) and all(a in nodes for a in addresses)
                           and {a: nodes[a] for a in addresses}, timeout=120, what="every worker node")
        if layout.get("wait_for_engines"):
            # Rows flow only once every engine of the pool is up: on a loaded 2-core machine one engine can start
            # so much later than the other that the first has taken all the work of a small job.
            ray.data.DataContext.get_current().wait_for_min_actors_s = JOB_TIMEOUT_S
        running = ThreadPoolExecutor(1).submit(run_job, job, show_progress=False)
        change = None
        if layout.get("change"):
            change = change_cluster(net, layout, workers, Ledger(job.output.path), running)
        summary = running.result(timeout=JOB_TIMEOUT_S)
        warnings = None
        if layout.get("dashboard"):  # what `genfarm submit` would warn about on this cluster
            warnings = [local_output_warning(output, layout["dashboard"]) for output in ("/data/out", "s3://b/out")]
        return {"summary": summary, "worker_nodes": list(workers.values()), "worker_addresses": addresses,
                "head_node": alive_nodes().get(net.host_ip), "change": change, "submit_warnings": warnings}
    finally:
        ray.shutdown()


if __name__ == "__main__":
    try:
        print(json.dumps(main(JobSpec.model_validate_json(sys.argv[1]), json.loads(sys.argv[2]))), flush=True)
    except BaseException:  # noqa: BLE001 - a stuck job thread would keep the process alive: report and leave
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
