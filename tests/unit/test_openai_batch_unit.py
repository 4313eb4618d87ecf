"""OpenAI batch files in-process: reading them (shape detection, custom_id ids, typed line errors), the `openai`
task's validation (the online API's rules), and the sink's output and error lines (the openai SDK's types), with
the echo engine."""

from __future__ import annotations

import json
import threading
import time

import openai.types as oai
import pandas as pd
import pytest
from echo_engine import EchoEngine
from openai.types.batch_error import BatchError
from openai.types.chat import ChatCompletion

from genfarm.batch import openai_files
from genfarm.batch.ledger import Ledger
from genfarm.batch.source import infer_schema, list_inputs, source_rows, to_block
from genfarm.batch.worker import GenerateWorker
from genfarm.models import ResolvedModel
from genfarm.rows import RowError
from genfarm.spec import InputSpec, JobSpec
from genfarm.task import FinishedJob, make_task

MODEL = ResolvedModel("echo", "/nowhere", "none")
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def line(custom_id, body: dict | None = None, url: str = CHAT, method: str = "POST", **extra) -> dict:
    body = body if body is not None else {"model": "echo", "messages": [{"role": "user", "content": "hi there"}]}
    return {"custom_id": custom_id, "method": method, "url": url, "body": body, **extra}


def chat(custom_id, text="tell me about bees", **params) -> dict:
    return line(custom_id, {"model": "echo", "messages": [{"role": "user", "content": text}], **params})


def completion(custom_id, prompt="once upon a time", **params) -> dict:
    return line(custom_id, {"model": "echo", "prompt": prompt, **params}, url=COMPLETIONS)


def write(path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def job_for(tmp_path, lines: list, **task) -> JobSpec:
    return JobSpec.model_validate({
        "input": {"path": write(tmp_path / "requests.jsonl", lines)},
        "task": {"type": "openai", "models": ["echo"], **task},
        "sampling": {"max_tokens": 4, "seed": 1}, "output": {"path": str(tmp_path / "out")}})


def run(job: JobSpec, engine: EchoEngine | None = None) -> dict:
    """What one engine actor does with every row, as one batch, then the task's finish hook."""
    fs, files = list_inputs(job.input)
    schema = infer_schema(fs, files[0])
    rows = [row for file in files for row in source_rows(fs, file, job.input)]
    Ledger(job.output.path).write_json("_genfarm/job.json", {"job_id": "job-1", "spec": job.model_dump(mode="json")})
    Ledger(job.output.path).start_run("run-1", "now")
    worker = GenerateWorker(job, MODEL, False, schema, "job-1", "run-1", engine=engine or EchoEngine())
    stats = worker(to_block(rows, schema)).to_pylist()[0]
    make_task(job.task).finish(FinishedJob(job.output.path, fs, files, job.input, None, "job-1"))
    return stats


def read_lines(path) -> list[dict]:
    return [json.loads(x) for x in open(path).read().splitlines()]


# --- reading ---------------------------------------------------------------------------------------------------

def test_a_batch_file_is_known_by_its_shape_and_its_custom_ids_are_the_row_ids(tmp_path):
    path = write(tmp_path / "requests.jsonl", [chat("a"), "{not json", chat("b", max_tokens=3), chat("a"),
                                               {"method": "POST", "url": CHAT, "body": {}}, line(7)])
    fs, [file] = list_inputs(InputSpec(path=path))
    assert file.format == "openai-batch"
    assert infer_schema(fs, file).names == ["custom_id", "method", "url", "body"]
    rows = list(source_rows(fs, file, InputSpec(path=path)))
    assert [r["_gf_id"] for r in rows] == ["a", "requests.jsonl:1", "b", "requests.jsonl:3", "requests.jsonl:4", "7"]
    assert [(r["_gf_error"] or "").split(":")[0] for r in rows] == ["", "bad_json", "", "duplicate_id",
                                                                    "missing_field", ""]
    assert json.loads(rows[2]["body"])["max_tokens"] == 3 and rows[2]["url"] == CHAT  # the body as JSON text
    plain = write(tmp_path / "plain.jsonl", [{"id": "x", "topic": "bees"}])
    assert list_inputs(InputSpec(path=plain))[1][0].format == "jsonl"
    assert list_inputs(InputSpec(path=plain, format="openai-batch"))[1][0].format == "openai-batch"


# --- the task's validation -------------------------------------------------------------------------------------

def check(row: dict, **config):
    task = make_task(JobSpec.model_validate({"input": {"path": "x"}, "output": {"path": "y"},
                                             "task": {"type": "openai", **config}}).task)
    data = {k: (json.dumps(v) if k == "body" else v) for k, v in row.items()}
    return task.prompt({**data, "_gf_id": row["custom_id"]}), task.sampling({**data, "_gf_id": row["custom_id"]})


def refused(row: dict, **config) -> tuple[str, str | None, str]:
    with pytest.raises(RowError) as caught:
        check(row, **config)
    assert caught.value.kind == "invalid_request"
    return openai_files.parse_request_error(caught.value.message)


def test_requests_become_prompts_and_sampling_as_the_online_api_reads_them():
    prompt, sampling = check(chat("a", max_completion_tokens=9, temperature=0, stop="x", n=2, seed=4))
    assert prompt.messages == [{"role": "user", "content": "tell me about bees"}] and prompt.text is None
    assert (sampling.max_tokens, sampling.temperature, sampling.stop, sampling.n, sampling.seed) == (9, 0, ("x",), 2, 4)
    prompt, sampling = check(completion("b", prompt=["one prompt"], max_tokens=5, top_p=0.5))
    assert prompt.text == "one prompt" and (sampling.max_tokens, sampling.top_p, sampling.temperature) == (5, 0.5, None)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    _, sampling = check(chat("c", response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                                          "schema": schema}}))
    assert sampling.structured == {"json": schema, "disable_any_whitespace": True}


def test_concurrent_batches_each_get_their_own_rows_request():
    """An engine actor renders several batches at once (workers.batches_in_flight) with one task object: whatever
    the task keeps between calls must not hand one thread's request to another."""
    task = make_task(JobSpec.model_validate({"input": {"path": "x"}, "output": {"path": "y"},
                                             "task": {"type": "openai"}}).task)

    class Yielding(type(task)):  # lets the other threads run right after each change of the task's state
        def __setattr__(self, name, value):
            super().__setattr__(name, value)
            time.sleep(0.001)

    task.__class__ = Yielding
    wrong: list[str] = []

    def render(worker: int) -> None:
        for i in range(50):
            row = chat(f"{worker}-{i}", text=f"row {worker}-{i}")
            data = {**row, "body": json.dumps(row["body"]), "_gf_id": row["custom_id"]}
            if task.prompt(data).messages[0]["content"] != f"row {worker}-{i}":
                wrong.append(row["custom_id"])

    threads = [threading.Thread(target=render, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def test_what_the_online_api_refuses_is_an_invalid_request_with_its_code():
    assert refused(line("a", url="/v1/embeddings"))[0] == "invalid_url"
    assert refused(completion("a"), endpoint=CHAT)[0] == "invalid_url"  # the batch's endpoint only
    assert refused(line("a", method="GET"))[0] == "invalid_method"
    assert refused(chat("a"), models=["served"]) == ("model_not_found", "model", "model 'echo' is not served here; "
                                                     "use 'served' (GET /v1/models)")
    assert refused(chat("a", logprobs=True))[:2] == ("invalid_parameter", "logprobs")  # unsupported, not ignored
    code, param, message = refused(chat("a", temperature=5))
    assert (code, param) == ("invalid_parameter", "temperature") and message.startswith("temperature: ")
    assert refused(line("a", body={"model": "echo", "messages": []}))[1] == "messages"
    assert refused(line("a", body=["not", "an", "object"]))[:2] == ("invalid_json", "body")
    assert refused(chat("a", stream=True))[1] == "stream"
    assert refused(completion("a", prompt=["one", "two"]))[1].startswith("prompt")
    assert refused(chat("a", response_format={"type": "json_schema", "json_schema": {"name": "x"}}))[1].startswith(
        "response_format")
    assert refused(chat("a", guided_regex="("))[:2] == ("invalid_parameter", "guided_regex")


# --- the sink and the files ------------------------------------------------------------------------------------

def test_a_job_writes_openai_output_and_error_files_every_custom_id_once(tmp_path):
    job = job_for(tmp_path, [chat("c1"), completion("p1", echo=True), chat("c2", n=2, seed=3), "{not json",
                             line("bad-url", url="/v1/embeddings"), chat("bad-param", temperature=9),
                             line("other-model", {"model": "gpt-4o", "prompt": "x"}, url=COMPLETIONS),
                             chat("long", text="word " * 300)])
    stats = run(job)
    assert (stats["rows"], stats["errors"]) == (8, 5)
    out = tmp_path / "out"
    assert len(pd.read_parquet(out)) == 4  # the Parquet results alone: c1, p1 and two samples of c2
    counts = Ledger(str(out)).count()  # rows, not samples: c2 asked for n=2 where the job's n is 1
    assert (counts.completed, counts.errors, counts.rows) == (3, 5, 8)
    outputs, errors = read_lines(out / "_openai" / "output.jsonl"), read_lines(out / "_openai" / "errors.jsonl")
    ids = [x["custom_id"] for x in outputs + errors]
    assert sorted(filter(None, ids)) == ["bad-param", "bad-url", "c1", "c2", "long", "other-model", "p1"]
    assert ids.count(None) == 1  # the line that is no JSON has no custom_id
    by_id = {x["custom_id"]: x for x in outputs + errors}
    for custom_id in ("c1", "c2"):
        body = ChatCompletion.model_validate(by_id[custom_id]["response"]["body"])
        assert body.object == "chat.completion" and body.model == "echo" and body.usage.total_tokens > 0
        assert body.usage.completion_tokens == sum(len(c.message.content.split()) for c in body.choices)
    assert [c.index for c in ChatCompletion.model_validate(by_id["c2"]["response"]["body"]).choices] == [0, 1]
    text = oai.Completion.model_validate(by_id["p1"]["response"]["body"])
    assert text.object == "text_completion" and text.choices[0].text.startswith("once upon a time")  # echo
    assert all(x["error"] is None and x["response"]["status_code"] == 200 and x["id"].startswith("batch_req_")
               for x in outputs)
    assert BatchError.model_validate(by_id[None]["error"]).code == "invalid_json_line"
    assert by_id["bad-url"]["error"]["code"] == "invalid_url" and by_id["bad-url"]["response"] is None
    refused = by_id["bad-param"]["response"]
    assert refused["status_code"] == 400 and refused["body"]["error"]["param"] == "temperature"
    assert by_id["other-model"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert by_id["long"]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert (out / "_openai" / "output").is_dir() and len(list((out / "_openai" / "output").iterdir())) == 1


def test_messages_the_chat_template_refuses_are_an_error_line_not_a_failed_part(tmp_path):
    system = line("sys", {"model": "echo", "messages": [{"role": "system", "content": "be brief"},
                                                        {"role": "user", "content": "hi"}]})
    stats = run(job_for(tmp_path, [chat("a"), system, chat("b")]), EchoEngine(refused_role="system"))
    assert (stats["rows"], stats["errors"]) == (3, 1)
    [error] = read_lines(tmp_path / "out" / "_openai" / "errors.jsonl")
    assert error["custom_id"] == "sys" and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["code"] == "invalid_messages"
    assert "system role not supported" in error["response"]["body"]["error"]["message"]
    assert sorted(x["custom_id"] for x in read_lines(tmp_path / "out" / "_openai" / "output.jsonl")) == ["a", "b"]


def test_collect_accounts_for_requests_that_never_ran(tmp_path):
    job = job_for(tmp_path, [chat("a"), chat("b"), chat("c")])
    fs, files = list_inputs(job.input)
    schema = infer_schema(fs, files[0])
    rows = list(source_rows(fs, files[0], job.input))
    ledger = Ledger(job.output.path)
    ledger.write_json("_genfarm/job.json", {"job_id": "job-1", "spec": job.model_dump(mode="json")})
    ledger.start_run("run-1", "now")
    GenerateWorker(job, MODEL, False, schema, "job-1", "run-1", engine=EchoEngine())(to_block(rows[:1], schema))
    assert openai_files.request_counts(job.output.path) == (1, 0)
    done = openai_files.collect(job.output.path, pending=("batch_cancelled", "the batch was cancelled"))
    assert (done["completed"], done["failed"]) == (1, 2) and done["prompt_tokens"] > 0
    errors = read_lines(done["errors"])
    assert [(x["custom_id"], x["error"]["code"]) for x in errors] == [("b", "batch_cancelled"),
                                                                       ("c", "batch_cancelled")]
    again = openai_files.collect(job.output.path)  # rewritten whole, never appended to
    assert (again["completed"], again["failed"]) == (1, 0)


def test_error_rows_map_to_openai_error_lines():
    def row(kind, message, raw='{"custom_id": "x"}'):
        return {"id": "x", "error_type": kind, "message": message, "input": raw, "job_id": "j"}

    assert openai_files.error_line(row("timeout", "too slow"))["response"]["status_code"] == 504
    engine = openai_files.error_line(row("engine_error", "boom"))["response"]
    assert engine["status_code"] == 500 and engine["body"]["error"]["type"] == "server_error"
    assert openai_files.error_line(row("duplicate_id", "twice"))["error"]["code"] == "duplicate_custom_id"
    assert openai_files.error_line(row("bad_json", "line 3", raw="{oops"))["custom_id"] is None
    same = [openai_files.error_line(row("timeout", "t")) for _ in range(2)]
    assert same[0] == same[1]  # a rewritten part repeats its lines exactly


# --- /v1/files and /v1/batches (in-process: no Ray; the runner is not started) ----------------------------------

class FakeServer:
    def __init__(self, spec):
        self.spec = spec


@pytest.fixture
def api(tmp_path, monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from genfarm.serve import batches
    from genfarm.serve.auth import RequireApiKey
    from genfarm.serve.bodylimit import BodyLimit
    from genfarm.serve.config import ServeSpec, hashed
    from genfarm.serve.metrics import ReplicaMetrics
    from genfarm.serve.replica import ReplicaState
    from genfarm.serve.responses import APIError

    started: list[str] = []
    monkeypatch.setattr(batches, "ensure_runner", lambda storage, batch_id: started.append(batch_id))
    spec = ServeSpec.model_validate({"model": {"name": "echo"}, "batches": {
        "storage": str(tmp_path / "store"), "max_file_lines": 3, "max_concurrent": 2, "max_batches_per_key": 1,
        "max_file_bytes": 2**20}})
    monkeypatch.setattr(ReplicaState, "keys", frozenset({hashed("k1"), hashed("k2")}))
    monkeypatch.setattr(ReplicaState, "server", FakeServer(spec))
    monkeypatch.setattr(ReplicaState, "metrics", ReplicaMetrics(lambda: 0, lambda: 0, lambda: 0))
    app = FastAPI()
    app.add_exception_handler(APIError, lambda request, err: err.response())
    # smaller than an upload: uploads are held to batches.max_file_bytes instead
    app.add_middleware(BodyLimit, max_bytes=1024, max_upload_bytes=spec.batches.max_file_bytes)
    app.add_middleware(RequireApiKey)
    app.state.route_labels = {}
    app.include_router(batches.router)
    client = TestClient(app)
    client.started = started
    return client


def key(name: str) -> dict:
    return {"Authorization": f"Bearer {name}"}


def upload(api, lines: list, who: str = "k1", purpose: str = "batch"):
    data = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()
    return api.post("/v1/files", headers=key(who), files={"file": ("in.jsonl", data)}, data={"purpose": purpose})


def test_uploads_are_checked_line_by_line_with_clear_400s(api):
    def refused(lines, purpose="batch"):
        answer = upload(api, lines, purpose=purpose)
        assert answer.status_code == 400, answer.text
        return answer.json()["error"]["code"]

    assert refused([chat("a"), "{oops"]) == "invalid_json_line"
    assert refused([chat("a"), chat("a")]) == "duplicate_custom_id"
    assert refused([{"method": "POST"}]) == "missing_custom_id"
    assert refused([chat(str(i)) for i in range(4)]) == "too_many_lines"
    assert refused([]) == "empty_file"
    assert refused([chat("a")], purpose="fine-tune") == "invalid_parameter"
    assert api.get("/v1/files", headers=key("k1")).json()["data"] == []  # nothing kept of a refused upload
    made = upload(api, [chat("a"), line("b", url="/v1/embeddings")])  # what the API refuses is the batch's to report
    assert made.status_code == 200 and oai.FileObject.model_validate(made.json()).bytes > 0
    long = upload(api, [chat("a", "x" * 4000)])  # over the request body limit, within the file limit
    assert long.status_code == 200 and oai.FileObject.model_validate(long.json()).bytes > 4000, long.text


def test_an_upload_too_large_for_max_file_bytes_is_refused_before_it_is_read(api):
    too_big = api.post("/v1/files", headers=key("k1"), files={"file": ("in.jsonl", b"x" * (3 * 2**20))},
                       data={"purpose": "batch"})
    assert too_big.status_code == 413 and "batches.max_file_bytes" in too_big.json()["error"]["message"]
    assert upload(api, [chat("a")]).status_code == 200


def test_a_request_with_two_keys_is_refused(api):
    """The key checked and the key that owns the request's files must be the same: with two Authorization
    headers a framework may check one and file under the other (an unknown key, with quotas of its own)."""
    two = [("Authorization", "Bearer junk"), ("Authorization", "Bearer k1")]
    refused = api.get("/v1/files", headers=two)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert api.get("/v1/files", headers=key("k1")).status_code == 200


def test_a_key_sees_and_cancels_its_own_batches_only(api):
    file_id = upload(api, [chat("a"), completion("b")]).json()["id"]
    assert api.get(f"/v1/files/{file_id}/content", headers=key("k1")).text.count("\n") == 2
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        assert api.get(path, headers=key("k2")).status_code == 404
    assert api.post("/v1/batches", headers=key("k2"), json={"input_file_id": file_id, "endpoint": CHAT}
                    ).json()["error"]["param"] == "input_file_id"
    made = api.post("/v1/batches", headers=key("k1"), json={"input_file_id": file_id, "endpoint": CHAT,
                                                            "completion_window": "24h", "metadata": {"team": "a"}})
    batch = oai.Batch.model_validate(made.json())
    assert batch.status == "validating" and batch.request_counts.total == 2 and api.started == [batch.id]
    assert batch.expires_at - batch.created_at == 24 * 3600 and batch.metadata == {"team": "a"}
    again = api.post("/v1/batches", headers=key("k1"), json={"input_file_id": file_id, "endpoint": CHAT})
    assert again.status_code == 429 and again.json()["error"]["code"] == "batch_quota_exceeded"
    for method, path in (("get", f"/v1/batches/{batch.id}"), ("post", f"/v1/batches/{batch.id}/cancel")):
        assert getattr(api, method)(path, headers=key("k2")).status_code == 404
    assert api.get("/v1/batches", headers=key("k2")).json()["data"] == []
    assert api.delete(f"/v1/files/{file_id}", headers=key("k1")).json()["error"]["code"] == "file_in_use"
    cancelling = api.post(f"/v1/batches/{batch.id}/cancel", headers=key("k1")).json()
    assert cancelling["status"] == "cancelling" and cancelling["cancelling_at"]
    listed = api.get("/v1/batches?limit=1", headers=key("k1")).json()
    assert [b["id"] for b in listed["data"]] == [batch.id] and listed["has_more"] is False


def test_batch_parameters_are_checked(api):
    file_id = upload(api, [chat("a")]).json()["id"]

    def refused(**body):
        answer = api.post("/v1/batches", headers=key("k1"), json={"input_file_id": file_id, "endpoint": CHAT,
                                                                   **body})
        assert answer.status_code == 400, answer.text
        return answer.json()["error"]["param"]

    assert refused(endpoint="/v1/embeddings") == "endpoint"
    assert refused(completion_window="1d") == "completion_window"
    assert refused(metadata={f"k{i}": "v" for i in range(17)}) == "metadata"
    assert api.get("/v1/batches/batch_nope", headers=key("k1")).status_code == 404
    unknown = api.get("/v1/batches", params={"after": "batch_nope"}, headers=key("k1"))
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "after"


def test_an_expired_batch_keeps_what_finished_and_metrics_count_batches(tmp_path):
    from genfarm.serve.batch_runner import BatchRunner
    from genfarm.serve.batch_store import Store
    from genfarm.serve.metrics import MetricsHub, batch_families

    store = Store(str(tmp_path / "store"))
    batch_id = "batch_x"
    job = job_for(tmp_path, [chat("a"), chat("b"), chat("c")])
    job = job.model_copy(update={"output": job.output.model_copy(update={"path": store.job_output(batch_id)})})
    fs, files = list_inputs(job.input)
    schema = infer_schema(fs, files[0])
    ledger = Ledger(job.output.path)
    ledger.write_json("_genfarm/job.json", {"job_id": "job-1", "spec": job.model_dump(mode="json")})
    ledger.start_run("run-1", "now")
    rows = list(source_rows(fs, files[0], job.input))
    GenerateWorker(job, MODEL, False, schema, "job-1", "run-1", engine=EchoEngine())(to_block(rows[:2], schema))
    record = {"id": batch_id, "status": "in_progress", "created_at": 1, "expires_at": 2, "output_file_id": None,
              "error_file_id": None, "request_counts": {"total": 3, "completed": 0, "failed": 0}, "_owner": "k"}
    store.save_batch(record)
    runner = BatchRunner(store.uri, batch_id)
    assert runner.stop_reason(record) == "expired"
    runner.finish(record, "expired")
    batch = store.batch(batch_id)
    assert batch["status"] == "expired" and batch["expired_at"] and batch["request_counts"] == {
        "total": 3, "completed": 2, "failed": 1}
    assert oai.BatchUsage.model_validate(batch["usage"]).output_tokens > 0
    errors = read_lines(store.path(store.file(batch["error_file_id"], "k")["_path"]))
    assert [(x["custom_id"], x["error"]["code"]) for x in errors] == [("c", "batch_expired")]
    assert len(read_lines(store.path(store.file(batch["output_file_id"], "k")["_path"]))) == 2
    hub = MetricsHub()
    hub.push("batches", batch_families({"expired": 1, "completed": 0}, {"prompt": 5, "completion": 7}))
    hub.push("batches", batch_families({"expired": 1, "completed": 0}, {"prompt": 5, "completion": 7}))
    page = hub.render()  # pushed by every replica under one name: counted once
    assert 'genfarm_batches{status="expired"} 1.0' in page and 'genfarm_batch_tokens_total{kind="completion"} 7.0' \
        in page


def test_error_rows_taken_back_for_retry_leave_the_error_file(tmp_path):
    job = job_for(tmp_path, [chat("ok"), chat("bad", temperature=9), "{not json"])
    run(job)
    assert Ledger(job.output.path).take_errors(["invalid_request"], "t1") == 1  # rewritten without the task's sink
    done = openai_files.collect(job.output.path)
    assert (done["completed"], done["failed"]) == (1, 1)  # the stale part file is not read
    assert [x["error"]["code"] for x in read_lines(done["errors"])] == ["invalid_json_line"]
