"""Helper process for test_multinode: a real Ray cluster of a head and two worker nodes (ray.cluster_utils), one
genfarm job on it, and what the test needs to know printed as JSON. Runs in its own process because a process can
belong to one Ray cluster only, and the test session already has one."""

from __future__ import annotations

import json
import sys

import pandas as pd
import ray
from ray.cluster_utils import Cluster

from genfarm.batch.job import run_job
from genfarm.spec import JobSpec

if __name__ == "__main__":
    job = JobSpec.model_validate(json.loads(sys.argv[1]))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # like a real head: no engines
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        summary = run_job(job, show_progress=False)
        nodes = sorted(pd.read_parquet(job.output.path)["node_id"].unique())
        worker_ids = sorted(node.node_id for node in workers)
        print(json.dumps({"summary": summary, "nodes": nodes, "worker_nodes": worker_ids}))
    finally:
        ray.shutdown()
        cluster.shutdown()
