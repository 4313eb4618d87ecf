"""Helper process for test_multinode: a real Ray cluster (ray.cluster_utils: a head and worker nodes, on this one
machine), one genfarm job on it and, while the job runs, optionally one worker node added or removed. What the test
needs is printed as one JSON line. Runs in its own process because a process can belong to one Ray cluster only, and
the test session already has one.

Usage: multinode_job.py JOB_JSON LAYOUT_JSON, LAYOUT = {"head_cpus": int, "nodes": [cpus of each worker node],
"change": null | "add" | "remove", "after_parts": committed parts to wait for before the change}.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster
from test_failures import wait_for

from genfarm.batch.job import run_job
from genfarm.batch.ledger import Ledger
from genfarm.spec import JobSpec

JOB_TIMEOUT_S = 240  # below the test's subprocess timeout, so a stuck job ends here with a traceback, not a kill


def parts_by(store: Ledger, node_id: str | None) -> int:
    """Committed result parts, all of them or only those an engine on `node_id` wrote."""
    if node_id is None:
        return len(store.parts())
    return sum(pq.read_table(part, columns=["node_id"]).column("node_id")[0].as_py() == node_id
               for part in store.parts())


def change_cluster(cluster: Cluster, workers: list, layout: dict, store: Ledger, running) -> dict:
    """Add a worker node once the job has committed `after_parts` parts, or remove the last worker node once its
    engine has committed that many: synchronised on progress, not time, so the change lands mid-job."""
    watched = workers[-1].node_id if layout["change"] == "remove" else None
    wait_for(lambda: parts_by(store, watched) >= layout["after_parts"] or running.done(), timeout=JOB_TIMEOUT_S,
             what=f"{layout['after_parts']} committed parts" + (f" from node {watched}" if watched else ""))
    if running.done():
        running.result()  # re-raise the job's own error, if any
        raise SystemExit("the job finished before the cluster changed: give it more rows or longer outputs")
    parts_before = len(store.parts())
    if layout["change"] == "add":
        node = cluster.add_node(num_cpus=layout["nodes"][-1])  # the same shape as the existing worker nodes
    else:
        node = workers[-1]
        cluster.remove_node(node, allow_graceful=False)  # kills its raylet and every process on it, like a lost VM
    return {"kind": layout["change"], "node": node.node_id, "parts_before": parts_before,
            "job_running": not running.done()}


def main(job: JobSpec, layout: dict) -> dict:
    # Like a real head: with head_cpus below cpus_per_worker it runs read tasks but never an engine.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": layout["head_cpus"]})
    workers = [cluster.add_node(num_cpus=cpus) for cpus in layout["nodes"]]
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        if layout.get("wait_for_engines"):
            # Rows flow only once every engine of the pool is up: on a loaded 2-core machine one engine can start
            # so much later than the other that the first has taken all the work of a small job.
            ray.data.DataContext.get_current().wait_for_min_actors_s = JOB_TIMEOUT_S
        running = ThreadPoolExecutor(1).submit(run_job, job, show_progress=False)
        change = None
        if layout.get("change"):
            change = change_cluster(cluster, workers, layout, Ledger(job.output.path), running)
        summary = running.result(timeout=JOB_TIMEOUT_S)
        return {"summary": summary, "worker_nodes": [node.node_id for node in workers], "change": change}
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    try:
        print(json.dumps(main(JobSpec.model_validate_json(sys.argv[1]), json.loads(sys.argv[2]))), flush=True)
    except BaseException:  # noqa: BLE001 - a stuck job thread would keep the process alive: report and leave
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
