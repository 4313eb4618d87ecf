"""A task defined here, in a test file, and nowhere in genfarm: it runs as a batch job and answers online, through
the same door as the built-in tasks (genfarm.task). genfarm loads it from the job file's and the serve config's
`plugins:` list, as a user's own module on PYTHONPATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import httpx
import pandas
import pyarrow as pa
import yaml
from pydantic import BaseModel

from genfarm.rows import Prompt, RowError, text_field
from genfarm.serve.protocol import SamplingParams, Usage
from genfarm.spec import TaskConfig
from genfarm.task import Route, Task

HERE = Path(__file__).parent
PLUGIN = Path(__file__).stem  # this module, as `plugins:` names it


class ShoutConfig(TaskConfig):
    type: Literal["shout"]
    suffix: str = "!"


class ShoutRequest(SamplingParams):
    text: str
    model: str | None = None


class ShoutResponse(BaseModel):
    id: str
    model: str
    text: str
    shout: str
    words: int
    finish_reason: str | None
    usage: Usage


class Shout(Task):
    """Continues a text and keeps the continuation in capitals, with its word count."""

    Config = ShoutConfig
    route = Route("/v1/shout", ShoutRequest, ShoutResponse, "Shout a continuation")
    output_columns = {"shout": pa.string(), "words": pa.int32()}

    def required_columns(self) -> list[str]:
        return ["text"]

    def prompt(self, row: dict) -> Prompt:
        return Prompt(text=text_field(row, "text", {}))

    def parse(self, row: dict, text: str) -> dict:
        if row.get("text") == "refuse":
            raise RowError("bad_type", "this task refuses the word 'refuse'")
        return {"shout": text.upper() + self.config.suffix, "words": len(text.split())}


def plugin_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}


def test_registered_task_is_known_to_job_files_and_serve_config():
    from genfarm.serve.config import ServeSpec
    from genfarm.spec import JobSpec, task_types

    assert "shout" in task_types()
    job = JobSpec.model_validate({"input": {"path": "x.jsonl"}, "task": {"type": "shout", "suffix": "?"},
                                  "output": {"path": "out"}})
    assert isinstance(job.task, ShoutConfig) and job.model_dump()["task"] == {"type": "shout", "suffix": "?"}
    assert ServeSpec.model_validate({"tasks": {"shout": {}}}).tasks["shout"] == ShoutConfig(type="shout")


def test_plugin_task_runs_as_a_batch_job(tiny, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "text": text}) + "\n"
                            for i, text in enumerate(["bees make", "refuse", "rivers run"])))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "plugins": [PLUGIN], "input": {"path": str(data), "id_column": "id"}, "task": {"type": "shout"},
        "model": {"name": tiny}, "engine": {"max_model_len": 256, "kv_cache_gib": 0.25},
        "sampling": {"max_tokens": 6, "seed": 3}, "output": {"path": str(tmp_path / "out")},
    }))
    run = subprocess.run([sys.executable, "-m", "genfarm", "run", str(job), "--no-progress", "--json"],
                         capture_output=True, text=True, timeout=600, env=plugin_env())
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert (summary["completed_rows"], summary["error_rows"]) == (2, 1)
    results = pandas.read_parquet(tmp_path / "out").sort_values("id")
    assert list(results["id"]) == ["r0", "r2"]
    assert all(row.shout == row.output_text.upper() + "!" for row in results.itertuples())
    assert str(results["words"].dtype) == "int32"
    errors = pandas.read_parquet(tmp_path / "out" / "_errors")
    assert list(errors["error_type"]) == ["bad_type"] and "refuses" in errors["message"][0]


def test_plugin_task_answers_online(tiny, tmp_path):
    from genfarm.serve.deploy import free_ports

    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "plugins": [PLUGIN], "model": {"name": tiny}, "tasks": {"shout": {"suffix": "!!"}},
        "engine": {"max_model_len": 512, "max_num_seqs": 4, "kv_cache_gib": 0.25}, "sampling": {"max_tokens": 6},
    }))
    port = free_ports(1)[0]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "genfarm", "serve", str(config), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=plugin_env())
    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C stops" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        url = f"http://127.0.0.1:{port}"
        answer = httpx.post(f"{url}/v1/shout", json={"text": "bees make", "temperature": 0}, timeout=120)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["shout"] == body["text"].upper() + "!!" and body["usage"]["completion_tokens"] == 6
        refused = httpx.post(f"{url}/v1/shout", json={"text": "refuse"}, timeout=120)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "bad_type"
        assert "/v1/shout" in httpx.get(f"{url}/openapi.json", timeout=30).json()["paths"]
        assert "/v1/articles" in httpx.get(f"{url}/openapi.json", timeout=30).json()["paths"]  # built-ins stay
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=180)
        finally:
            proc.kill()
