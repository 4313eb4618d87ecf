"""Helper process for test_multinode: the worker nodes (each in a network namespace of its own, see netns.py; the
test starts the head on the host side of the bridge) and the driver of one genfarm job on them, and, while the job
runs, one worker node added (started in a spare namespace) or removed (every process in its namespace killed). What
the test needs is printed as one JSON line. Runs in its own process because a process can belong to one Ray cluster
only, and the test session already has one.

Usage: multinode_job.py JOB_JSON LAYOUT_JSON, LAYOUT = {"head": "IP:PORT", "network": netns.Network's fields,
"nodes": [cpus of each worker node to start], "node_command": {"IP": argv of `ray start` for the node of that
address}, "logs": folder for the nodes' output, "change": null | "add" | "remove", "after_parts": committed parts to
wait for before the change, "wait_for_engines": bool, "dashboard": URL or null}. The job's input and output are on
object storage (credentials in the environment, which the nodes inherit).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import subprocess
import sys
import time
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


def start_node(net: Network, index: int, layout: dict) -> subprocess.Popen:
    """Start the worker node of namespace `index` (`ray start --block` under a /tmp of its own), logging to a file."""
    address = net.node_ip(index)
    with open(os.path.join(layout["logs"], f"node{index}.log"), "ab") as log:
        return net.popen(index, layout["node_command"][address], private_tmp=True, stdout=log,
                         stderr=subprocess.STDOUT)


def join(net: Network, indexes: list[int], layout: dict, tries: int = 3) -> dict[str, str]:
    """Start the worker nodes of these namespaces and wait until all are in the cluster: address -> node id.
    A node whose `ray start` gave up (its raylet has 30 s to register, which a loaded machine can exceed) is cleared
    and started again."""
    started = {index: start_node(net, index, layout) for index in indexes}
    restarts = {index: 0 for index in indexes}

    def joined() -> dict[str, str] | None:
        nodes = alive_nodes()
        for index, process in started.items():
            if process.poll() is not None and net.node_ip(index) not in nodes and restarts[index] < tries:
                net.kill(index)  # whatever the failed start left in the namespace
                started[index], restarts[index] = start_node(net, index, layout), restarts[index] + 1
        addresses = [net.node_ip(index) for index in indexes]
        return {a: nodes[a] for a in addresses} if all(a in nodes for a in addresses) else None

    return wait_for(joined, timeout=180, what=f"worker nodes {indexes} to join")


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
    rows_before = store.count().completed
    if layout["change"] == "add":
        index = len(workers)  # the spare namespace: one more than the nodes started first
        (address, node), = join(net, [index], layout).items()
    else:
        address, node = last, workers[last]
        net.kill(list(workers).index(last))  # its raylet and every process on it, like a machine that is lost
    return {"kind": layout["change"], "node": node, "address": address, "rows_before": rows_before,
            "job_running": not running.done()}


def main(job: JobSpec, layout: dict) -> dict:
    net = Network(**{**layout["network"], "subnet": ipaddress.ip_network(layout["network"]["subnet"])})
    addresses = [net.node_ip(index) for index in range(len(layout["nodes"]))]
    for attempt in range(3):  # a loaded machine's GCS may not answer the first time
        try:
            ray.init(address=layout["head"], _node_ip_address=net.host_ip, log_to_driver=False,
                     logging_level=logging.WARNING)
            break
        except ConnectionError:
            ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(10)
    try:
        workers = join(net, list(range(len(layout["nodes"]))), layout)
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
