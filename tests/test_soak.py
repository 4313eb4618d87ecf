"""Overload for real, briefly: benchmarks/soak.py's soak (part A) against `genfarm serve` on the tiny model, 4x the
replica's capacity for SECONDS, with streamed and whole answers and clients that leave mid-stream or before any
answer. Every answer is 200, 429, 503 or a deliberate timeout (or the client's own cancel), none outlives
limits.request_timeout_s, and once the load stops the engine holds no request: nothing leaked. No timing or
throughput assertions: the machine is shared."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: benchmarks/ is no installed package
from benchmarks import soak  # noqa: E402

SECONDS = 40
CAPACITY = 8
pytestmark = pytest.mark.timeout(900)


def test_4x_capacity_answers_only_200_429_503_and_leaks_no_request(tiny, tmp_path):
    config = soak.service_config(tiny, max_concurrent=CAPACITY, max_queued=CAPACITY, timeout_s=30,
                                 kv_cache_gib=0.25, max_tokens=16)
    with soak.Service(config, tmp_path) as service:
        result = soak.soak(service, clients=4 * CAPACITY, seconds=SECONDS, max_tokens=16)
    summary = {k: v for k, v in result.items() if k != "records"}
    print(json.dumps(summary, indent=1))
    assert result["failures"] == {}, summary["by_outcome"]
    assert result["hung"] == 0 and result["longest_request_s"] < result["hang_s"], summary
    assert result["by_outcome"].get("200", 0) > 0, summary["by_outcome"]
    idle = result["engine_requests"]
    assert idle["seconds_to_zero"] is not None, idle  # engine, running and queued all back to zero
