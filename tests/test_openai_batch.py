"""OpenAI's batch API for real: `genfarm run` on an OpenAI batch input file, and `genfarm serve` (local Ray, the tiny
model) driven by the openai SDK through /v1/files and /v1/batches: a batch run to completed, another key kept out,
a cancelled batch, and a service killed mid-batch and started again."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import make_job
from openai.types import Batch, Completion
from openai.types.batch_error import BatchError
from openai.types.chat import ChatCompletion

from genfarm.serve.deploy import free_ports

KEY, OTHER = "batch-key-1", "batch-key-2"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
BODIES = {CHAT: ChatCompletion, COMPLETIONS: Completion}


def chat(custom_id: str, model: str, **params) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": model, "messages": [{"role": "user", "content": f"about {custom_id}"}], **params}}


def completion(custom_id: str, model: str, **params) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": COMPLETIONS,
            "body": {"model": model, "prompt": f"once upon {custom_id}", **params}}


def jsonl(lines: list) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def parse(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def check_lines(outputs: list[dict], errors: list[dict], urls: dict[str, str]) -> None:
    """Every line in OpenAI's shape: an output line's body is the online API's answer (the SDK's own type)."""
    for x in outputs + errors:
        assert set(x) == {"id", "custom_id", "response", "error"} and x["id"].startswith("batch_req_")
    for x in outputs:
        assert x["error"] is None and x["response"]["status_code"] == 200 and x["response"]["request_id"]
        body = BODIES[urls[x["custom_id"]]].model_validate(x["response"]["body"])
        assert body.usage.total_tokens == body.usage.prompt_tokens + body.usage.completion_tokens
        assert body.usage.prompt_tokens > 0 and body.usage.completion_tokens > 0
    for x in errors:
        if x["error"] is not None:
            assert x["response"] is None and BatchError.model_validate(x["error"]).code
        else:
            assert x["response"]["status_code"] >= 400 and x["response"]["body"]["error"]["code"]


# --- genfarm run on an OpenAI batch file --------------------------------------------------------------------------

def test_genfarm_run_on_a_batch_file_writes_openai_output_files(tmp_path, tiny):
    lines = [chat("c1", tiny, max_tokens=5), chat("c2", tiny, n=2, temperature=1.0, seed=3),
             completion("p1", tiny, max_tokens=4, echo=True), completion("p2", tiny),
             {"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
             chat("bad-param", tiny, top_p=3), chat("other-model", "gpt-4o-mini"), "{not json"]
    source = tmp_path / "requests.jsonl"
    source.write_bytes(jsonl(lines))
    job = make_job(source, tmp_path / "out", tiny, task={"type": "openai", "models": [tiny]},
                   input={"id_column": None}, workers={"batch_size": 3})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job.model_dump(mode="json", exclude_defaults=True)))
    done = subprocess.run([sys.executable, "-m", "genfarm", "run", str(job_file), "--no-progress", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert (summary["input_rows"], summary["error_rows"]) == (8, 4)
    files = tmp_path / "out" / "_openai"
    outputs, errors = parse((files / "output.jsonl").read_text()), parse((files / "errors.jsonl").read_text())
    urls = {x["custom_id"]: x["url"] for x in lines if isinstance(x, dict)}
    check_lines(outputs, errors, urls)
    assert sorted(x["custom_id"] for x in outputs) == ["c1", "c2", "p1", "p2"]
    assert sorted(str(x["custom_id"]) for x in errors) == ["None", "bad-param", "bad-url", "other-model"]
    by_id = {x["custom_id"]: x for x in outputs + errors}
    first = ChatCompletion.model_validate(by_id["c1"]["response"]["body"])
    assert first.usage.completion_tokens == 5 and first.choices[0].finish_reason == "length"  # the body's max_tokens
    assert len(ChatCompletion.model_validate(by_id["c2"]["response"]["body"]).choices) == 2
    echoed = Completion.model_validate(by_id["p1"]["response"]["body"])
    assert echoed.choices[0].text.startswith("once upon p1") and echoed.usage.completion_tokens == 4
    assert by_id["bad-url"]["error"]["code"] == "invalid_url"
    assert by_id["bad-param"]["response"]["body"]["error"]["param"] == "top_p"
    assert by_id["other-model"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert by_id[None]["error"]["code"] == "invalid_json_line"


# --- the service ---------------------------------------------------------------------------------------------------

class Service:
    def __init__(self, folder: Path, config: Path, model: str):
        self.folder, self.config, self.model = folder, config, model
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log_path = self.folder / f"serve-{self.starts}.log"
        log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "genfarm", "serve", self.config, "--port",
                                      str(self.port)], stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while "Ctrl-C stops" not in (text := log_path.read_text()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"genfarm serve did not come up:\n{text[-3000:]}")
            time.sleep(1)
        assert re.search(r"--address (http://\S+)", text)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            assert self.proc.wait(timeout=180) == 0
        finally:
            self.proc.kill()

    def kill(self) -> None:
        """Every process of the service at once (SIGKILL), as a crash or a lost machine would stop it: nothing
        finishes gracefully, Ray and the batch's runner and job included."""
        import psutil

        from genfarm.reaper import kill_all

        front = psutil.Process(self.proc.pid)
        assert not kill_all([front, *front.children(recursive=True)], timeout_s=30)

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def upload(self, lines: list, key: str = KEY):
        return self.client(key).files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")

    def wait(self, batch_id: str, until, timeout: float = 400, key: str = KEY) -> Batch:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = self.client(key).batches.retrieve(batch_id)
            if until(batch):
                return batch
            time.sleep(1)
        raise AssertionError(f"batch {batch_id} still {batch.status} ({batch.request_counts}) after {timeout}s")

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}


def finished(batch: Batch) -> bool:
    return batch.status in ("completed", "failed", "cancelled", "expired")


def running_batch(service: Service, lines: list) -> Batch:
    """A batch of `lines`, once it has committed some of its requests (and not all)."""
    created = service.client().batches.create(input_file_id=service.upload(lines).id, endpoint=CHAT,
                                              completion_window="24h")
    running = service.wait(created.id, lambda b: b.request_counts.completed >= 2 or finished(b))
    assert running.status == "in_progress", running
    return running


@pytest.fixture(scope="module")
def service(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("batches")
    config = folder / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": tiny},
        # Half a logical CPU each for the replica and a batch's engine: the local Ray has two, and a batch job's
        # read task takes one.
        "engine": {"max_model_len": 512, "max_num_seqs": 8, "kv_cache_gib": 0.25, "cpus_per_worker": 0.5},
        "sampling": {"max_tokens": 8},
        "api_keys": [KEY, OTHER],
        "batches": {"storage": str(folder / "store"), "max_file_lines": 100, "batch_size": 2,
                    "max_batches_per_key": 1, "max_concurrent": 2},
    }))
    running = Service(folder, config, tiny)
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def completed(service):
    """A batch of chat and completion requests, three of them invalid, run to its end."""
    m = service.model
    lines = [chat(f"chat-{i}", m, max_tokens=6, temperature=0) for i in range(4)]
    lines += [completion(f"text-{i}", m, max_tokens=5) for i in range(3)]
    lines += [{"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {"model": m}},
              chat("bad-param", m, temperature=7), chat("other-model", "gpt-4o-mini")]
    upload = service.upload(lines)
    created = service.client().batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h",
                                              metadata={"suite": "openai-batch"})
    statuses = [created.status]
    batch = service.wait(created.id, lambda b: statuses.append(b.status) or finished(b))
    return {"lines": lines, "upload": upload, "created": created, "batch": batch, "statuses": statuses}


def test_a_batch_runs_to_completed_with_output_and_error_files(service, completed):
    batch, lines = completed["batch"], completed["lines"]
    assert completed["created"].status == "validating" and completed["created"].metadata == {"suite": "openai-batch"}
    assert batch.status == "completed", batch
    assert "in_progress" in completed["statuses"]
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (10, 7, 3)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at and batch.model == service.model
    client = service.client()
    outputs = parse(client.files.content(batch.output_file_id).text)
    errors = parse(client.files.content(batch.error_file_id).text)
    ids = [x["custom_id"] for x in outputs + errors]
    assert sorted(ids) == sorted(x["custom_id"] for x in lines)  # every custom_id exactly once
    check_lines(outputs, errors, {x["custom_id"]: x["url"] for x in lines})
    tokens = [x["response"]["body"]["usage"] for x in outputs]
    assert all(t["completion_tokens"] == (6 if x["custom_id"].startswith("chat") else 5)
               for t, x in zip(tokens, outputs))  # the random model never stops early: each request's max_tokens
    assert batch.usage.output_tokens == sum(t["completion_tokens"] for t in tokens)
    assert batch.usage.input_tokens == sum(t["prompt_tokens"] for t in tokens)
    by_id = {x["custom_id"]: x for x in errors}
    assert by_id["bad-url"]["error"]["code"] == "invalid_url"
    assert by_id["bad-param"]["response"]["body"]["error"]["param"] == "temperature"
    assert by_id["other-model"]["response"]["body"]["error"]["code"] == "model_not_found"
    output_file = client.files.retrieve(batch.output_file_id)
    assert output_file.purpose == "batch_output" and output_file.bytes > 0
    assert {f.id for f in client.files.list()} >= {completed["upload"].id, batch.output_file_id, batch.error_file_id}
    assert batch.id in [b.id for b in client.batches.list(limit=5)]
    deadline = time.monotonic() + 30
    while service.metrics().get('genfarm_batches{status="completed"}', 0) < 1 and time.monotonic() < deadline:
        time.sleep(1)
    metrics = service.metrics()
    assert metrics['genfarm_batches{status="completed"}'] >= 1
    assert metrics['genfarm_batch_tokens_total{kind="completion"}'] >= batch.usage.output_tokens


def test_another_key_can_neither_see_nor_cancel_a_batch_or_its_files(service, completed):
    other, batch = service.client(OTHER), completed["batch"]
    for call in (lambda: other.batches.retrieve(batch.id), lambda: other.batches.cancel(batch.id),
                 lambda: other.files.retrieve(batch.output_file_id),
                 lambda: other.files.content(completed["upload"].id), lambda: other.files.delete(batch.error_file_id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert other.batches.list().data == [] and other.files.list().data == []
    with pytest.raises(openai.BadRequestError):  # another key's file is no file to run
        other.batches.create(input_file_id=completed["upload"].id, endpoint=CHAT, completion_window="24h")
    assert service.client().files.retrieve(batch.output_file_id).id == batch.output_file_id  # still there


def test_uploads_are_checked_and_limits_answered_in_openai_shape(service):
    client = service.client()
    with pytest.raises(openai.BadRequestError) as caught:
        service.upload([chat("a", service.model), chat("a", service.model)])
    assert caught.value.body["code"] == "duplicate_custom_id" and "line 2" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        service.upload([chat(str(i), service.model) for i in range(101)])
    assert caught.value.body["code"] == "too_many_lines"
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
    assert caught.value.body["param"] == "input_file_id"


def test_a_cancelled_batch_returns_the_requests_that_finished(service):
    m = service.model
    # Enough work that the batch still runs after the cancel (a fast machine ran 48 requests of 96 tokens before it)
    lines = [chat(f"slow-{i}", m, max_tokens=400, temperature=0) for i in range(100)]
    created = running_batch(service, lines)
    with pytest.raises(openai.RateLimitError) as caught:  # batches.max_batches_per_key: 1
        service.client().batches.create(input_file_id=created.input_file_id, endpoint=CHAT, completion_window="24h")
    assert caught.value.body["code"] == "batch_quota_exceeded"
    with pytest.raises(openai.NotFoundError):
        service.client(OTHER).batches.cancel(created.id)
    assert service.client().batches.cancel(created.id).status == "cancelling"
    batch = service.wait(created.id, finished, timeout=120)
    assert batch.status == "cancelled" and batch.cancelling_at and batch.cancelled_at, batch
    client = service.client()
    outputs = parse(client.files.content(batch.output_file_id).text)
    errors = parse(client.files.content(batch.error_file_id).text)
    assert len(outputs) >= 2 and sorted(x["custom_id"] for x in outputs + errors) == sorted(x["custom_id"]
                                                                                           for x in lines)
    assert {x["error"]["code"] for x in errors} <= {"batch_cancelled"} and len(errors) >= 1
    check_lines(outputs, errors, {x["custom_id"]: CHAT for x in lines})
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(outputs), len(errors))


def test_a_batch_survives_the_service_killed_and_started_again(service):
    m = service.model
    # Enough work that the kill strikes mid-way (a fast machine ran 36 requests of 64 tokens before it)
    lines = [chat(f"r-{i}", m, max_tokens=256, temperature=0) for i in range(100)]
    created = running_batch(service, lines)
    job = Path(service.config).parent / "store" / "batches" / created.id / "job"
    first_run = json.loads((job / "_genfarm" / "run.json").read_text())["run_id"]
    service.kill()
    assert 2 <= len(pq.read_table(job, columns=["id"])) < len(lines)  # the job was cut off mid-way
    service.start()
    batch = service.wait(created.id, finished)
    assert batch.status == "completed" and batch.request_counts.completed == len(lines), batch
    assert json.loads((job / "_genfarm" / "run.json").read_text())["run_id"] != first_run  # resumed, not redone
    ids = pq.read_table(job, columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted(x["custom_id"] for x in lines)  # each request generated exactly once
    outputs = parse(service.client().files.content(batch.output_file_id).text)
    assert sorted(x["custom_id"] for x in outputs) == sorted(x["custom_id"] for x in lines)
