"""Shared fixtures: a real Ray instance, the tiny offline model, and helpers to write datasets and job specs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny_model  # noqa: E402

from genfarm.spec import JobSpec  # noqa: E402


def pytest_collection_modifyitems(items):
    """Every test outside tests/unit runs real Ray and/or the real vLLM engine: mark it e2e (`-m "not e2e"`, or
    `pytest tests/unit`, runs the fast layer alone)."""
    unit = Path(__file__).parent / "unit"
    for item in items:
        if unit not in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> str:
    return str(tiny_model.build(tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="session")
def ray_session():
    import logging

    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_job(input_path, output_path, model: str, task: dict | None = None, **sections) -> JobSpec:
    """A job spec for the tiny model: small engine, short outputs, unless a test says otherwise (`output={...}`
    adds output settings to the path)."""
    data = {
        "input": {"path": str(input_path), "id_column": "id"},
        "task": task or {"type": "article"},
        "model": {"name": model},
        "engine": {"max_model_len": 512, "max_num_seqs": 32, "kv_cache_gib": 0.25},
        "sampling": {"max_tokens": 16, "temperature": 0.8, "seed": 1},
        "workers": {"count": 1, "batch_size": 8},
        "output": {"path": str(output_path)},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return JobSpec.model_validate(data)


def topics(n: int) -> list[dict]:
    return [{"id": f"t{i:03d}", "topic": f"topic number {i}"} for i in range(n)]
