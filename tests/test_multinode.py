"""A real multi-node Ray cluster (a head and two worker nodes, on this one machine): engine actors spread over the
worker nodes and both generate rows, which the node_id column shows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import make_job, topics, write_jsonl


def test_rows_are_generated_on_both_worker_nodes(tmp_path, tiny):
    data = write_jsonl(tmp_path / "t.jsonl", topics(400))
    job = make_job(data, tmp_path / "out", tiny, workers={"count": 2, "batch_size": 8},
                   engine={"cpu_threads": 1}, sampling={"max_tokens": 48})
    helper = Path(__file__).parent / "multinode_job.py"
    done = subprocess.run([sys.executable, str(helper), job.model_dump_json()], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{\"summary\"")))
    assert result["summary"]["completed_rows"] == 400
    assert result["nodes"] == result["worker_nodes"]  # both worker nodes generated rows, the head none
