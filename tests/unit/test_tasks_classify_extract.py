"""The classify and extract tasks without a model: config errors, prompts, the constraints they ask for, parsing
(invalid output is a typed row error), the online answer with a stand-in service, eval scores, and the worker's
plumbing with the echo engine."""

from __future__ import annotations

import asyncio
import json
import math
import re

import pandas as pd
import pyarrow as pa
import pytest
from echo_engine import EchoEngine
from test_pipeline import run_worker

from genfarm.batch.ledger import MANIFEST, Ledger
from genfarm.engine import Completion
from genfarm.errors import UserError
from genfarm.rows import RowError
from genfarm.serve.config import ServeSpec
from genfarm.spec import JobSpec, validate
from genfarm.task import make_task
from genfarm.tasks.classify import ClassifyRequest, label_regex, score
from genfarm.tasks.extract import ExtractionRequest

LABELS = {"billing": "payments and invoices", "technical": "errors and bugs", "other": "anything else"}
SCHEMA = {"type": "object", "required": ["product", "sentiment"], "additionalProperties": False,
          "properties": {"product": {"type": "string", "description": "the product's name"},
                         "sentiment": {"enum": ["positive", "negative"]},
                         "stars": {"type": "integer"}, "issues": {"type": "array", "items": {"type": "string"}}}}


def job(task: dict, **sections) -> JobSpec:
    data = {"input": {"path": "in.jsonl"}, "task": task, "output": {"path": "out"}, **sections}
    return validate(JobSpec, data, "job.yaml")


def task_of(config: dict):
    return make_task(job(config).task)


# --- classify ---------------------------------------------------------------------------------------------------
def test_classify_prompt_shows_instructions_labels_and_the_mapped_text():
    task = task_of({"type": "classify", "labels": LABELS, "instructions": "Route the message.",
                    "columns": {"text": "body"}})
    prompt = task.prompt({"body": "I was charged twice"})
    system, user = prompt.messages
    assert system["role"] == "system" and "classifier" in system["content"]
    assert user["content"].startswith("Route the message.")
    assert "- billing: payments and invoices\n- technical: errors and bugs\n- other: anything else" in user["content"]
    assert "I was charged twice" in user["content"] and task.required_columns() == ["body"]
    with pytest.raises(RowError, match="missing_field"):
        task.prompt({"text": "the unmapped column"})


def test_classify_asks_for_a_choice_and_its_logprob_and_parses_the_label():
    task = task_of({"type": "classify", "labels": ["spam", "ham"], "system_prompt": "Be brief."})
    assert task.prompt({"text": "hi"}).messages[0]["content"] == "Be brief."
    sampling = task.sampling({"text": "hi"})
    assert sampling.structured == {"choice": ["spam", "ham"]} and sampling.logprobs
    assert sampling.engine_extra()["logprobs"] == 0
    assert task.output_schema() == {"label": pa.string(), "confidence": pa.float64()}
    assert task.parse({}, "ham") == {"label": "ham", "confidence": None}
    assert task.parse({}, "spam", logprob=math.log(0.25)) == {"label": "spam", "confidence": pytest.approx(0.25)}
    with pytest.raises(RowError) as caught:
        task.parse({}, "eggs")
    assert caught.value.kind == "invalid_output" and "not one of the choices" in caught.value.message


def test_multi_label_answers_one_boolean_per_label_and_lists_those_that_apply():
    task = task_of({"type": "classify", "labels": LABELS, "multi_label": True})
    sampling = task.sampling({"text": "x"})
    assert sampling.structured == {"regex": label_regex(list(LABELS))} and sampling.logprobs
    assert "true if it applies" in task.prompt({"text": "x"}).messages[-1]["content"]
    assert task.output_schema() == {"labels": pa.list_(pa.string()), "confidence": pa.float64()}
    answer = json.dumps({"billing": True, "technical": False, "other": True})
    assert task.parse({}, answer, logprob=0.0) == {"labels": ["billing", "other"], "confidence": 1.0}
    for bad in ('{"billing": true', '{"billing": true, "technical": false}', '["billing"]'):
        with pytest.raises(RowError, match="invalid_output"):
            task.parse({}, bad)


def test_the_multi_label_regex_matches_exactly_the_compact_json_of_any_labels():
    labels = ["billing", 'say "hi" (now)', "a.b|c", "ünï", "back\\slash", "a-b #1 & ~ [x]{2}"]
    pattern = label_regex(labels)
    answer = {name: i % 2 == 0 for i, name in enumerate(labels)}
    assert re.fullmatch(pattern, json.dumps(answer, separators=(",", ":"), ensure_ascii=False))
    assert not re.fullmatch(pattern, json.dumps(answer, ensure_ascii=False))  # no spaces
    assert not re.fullmatch(pattern, json.dumps(dict(reversed(answer.items())), separators=(",", ":")))


@pytest.mark.parametrize("task, expected", [
    ({"labels": ["only"]}, "task.labels: 1 label(s) leave nothing to choose. Fix: give at least two labels"),
    ({"labels": ["a", "b", "a"]}, "task.labels: a is listed twice. Fix: list each label once"),
    ({"labels": [True, False]}, "task.labels: label True is not text. Fix: quote it"),
    ({"labels": ["a", " b"]}, "task.labels: label ' b' is empty or has surrounding spaces"),
    ({"labels": {"a": "x", "b": 3}}, "task.labels: the description of 'b' is not text"),
    ({"labels": "a, b"}, "task.labels: labels are a list or a mapping label -> description"),
    ({"labels": ["a", "b"], "multilabel": True}, "task.multilabel: unknown field. Fix: did you mean 'multi_label'?"),
    ({}, "job.yaml: task.labels: required field is missing. Fix: add task.labels to the job file"),
    ({"labels": None}, "task.labels: labels are a list or a mapping label -> description, got None"),
])
def test_classify_config_errors_are_one_line(task, expected):
    with pytest.raises(UserError) as caught:
        job({"type": "classify", **task})
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_a_service_answers_classify_and_extract_once_its_config_gives_their_labels_and_schema():
    assert not {"classify", "extract"} & set(ServeSpec().tasks)  # the routes that need settings are not served
    spec = validate(ServeSpec, {"tasks": {"classify": {"labels": ["a", "b"]}, "extract": {"schema": SCHEMA}}}, "x")
    assert spec.tasks["classify"].labels == ["a", "b"] and spec.tasks["extract"].json_schema == SCHEMA


class StandIn:
    """What the online service lends a task (genfarm.task.Online), answering one fixed text."""

    model = "stand-in"

    def __init__(self, answer: str):
        self.answer, self.prompts = answer, []

    def encode(self, prompt, param=None):
        self.prompts.append(prompt)
        return [1, 2, 3]

    async def complete(self, prompts, wanted=None):
        self.wanted = wanted
        return [[Completion(self.answer, "stop", 1, 0, -0.5)] for _ in prompts]

    def reject(self, message, param=None, code="invalid_parameter"):
        return ValueError(f"{param}: {message}")

    def usage(self, prompts):
        return {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}


def answer(task, request, online):
    row = request.model_dump(exclude_none=True, exclude={"model", "max_tokens", "temperature", "top_p", "n", "seed",
                                                         "stop", "user"})
    return asyncio.run(task.respond(row, online))


def test_classify_online_takes_the_request_labels_or_the_service_default():
    service = task_of({"type": "classify", "labels": ["spam", "ham"]})
    online = StandIn("ham")
    response = answer(service, ClassifyRequest(text="hello"), online)
    assert (response.label, response.labels, response.object, response.model) == ("ham", None, "classification",
                                                                                  "stand-in")
    online = StandIn('{"red":true,"blue":true}')
    response = answer(service, ClassifyRequest(text="sky", labels=["red", "blue"], multi_label=True), online)
    assert response.labels == ["red", "blue"] and "- red\n- blue" in online.prompts[0].messages[-1]["content"]
    with pytest.raises(RowError, match="invalid_output"):
        answer(service, ClassifyRequest(text="hello"), StandIn("maybe"))
    with pytest.raises(ValueError, match="listed twice"):
        ClassifyRequest(text="x", labels=["a", "a"])


# --- extract ----------------------------------------------------------------------------------------------------
def test_extract_schema_inline_or_from_a_file_becomes_typed_columns(tmp_path):
    path = tmp_path / "fields.yaml"
    path.write_text(json.dumps(SCHEMA))
    for given in (SCHEMA, str(path)):
        task = task_of({"type": "extract", "schema": given})
        assert task.output_schema() == {"product": pa.string(), "sentiment": pa.string(), "stars": pa.int64(),
                                        "issues": pa.string()}
    sampling = task.sampling({"text": "x"})
    assert sampling.structured == {"json": SCHEMA, "disable_any_whitespace": True} and not sampling.logprobs
    assert JobSpec.model_validate(job({"type": "extract", "schema": SCHEMA}).model_dump(mode="json")).task.json_schema \
        == SCHEMA  # the manifest reads back


def test_extract_prompt_lists_the_fields_with_their_types_and_descriptions():
    task = task_of({"type": "extract", "schema": SCHEMA, "instructions": "Read the review."})
    user = task.prompt({"text": "Great kettle, 5 stars"}).messages[-1]["content"]
    assert user.startswith("Read the review.") and "Great kettle, 5 stars" in user
    assert "- product (string): the product's name" in user
    assert '- sentiment (one of: "positive", "negative")' in user
    assert "- stars (integer, optional)" in user and "- issues (list of string, optional)" in user


def test_extract_parses_valid_json_into_columns_and_refuses_the_rest():
    task = task_of({"type": "extract", "schema": SCHEMA})
    text = json.dumps({"product": "kettle", "sentiment": "positive", "issues": ["loud", "slow"]})
    assert task.parse({}, text) == {"product": "kettle", "sentiment": "positive", "stars": None,
                                    "issues": '["loud", "slow"]'}
    for bad, why in (('{"product": "kettle"', "not JSON"), ('{"product": "kettle", "sentiment": "meh"}', "schema")):
        with pytest.raises(RowError) as caught:
            task.parse({}, bad)
        assert caught.value.kind == "invalid_output" and why in caught.value.message


@pytest.mark.parametrize("schema, expected", [
    ({"type": "array", "items": {"type": "string"}}, "task.schema: the schema must describe an object with properties"),
    ({"type": "object", "properties": {}}, "task.schema: the schema must describe an object with properties"),
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "task.schema: not a valid JSON schema at"),
    ({"type": "object", "properties": {"a": {"type": "integer", "maximum": 2**64}}},
     "task.schema: the JSON schema has an integer beyond 64 bits at properties/a/maximum"),
    ({"$schema": 5, "type": "object", "properties": {"a": {"type": "string"}}},
     "task.schema: the JSON schema's $schema is not a URI"),
    ("missing.json", "task.schema: missing.json is neither a schema nor a file"),
    (None, "job.yaml: task.schema: required field is missing. Fix: add task.schema to the job file"),
])
def test_extract_config_errors_are_one_line(schema, expected):
    with pytest.raises(UserError) as caught:
        job({"type": "extract", **({} if schema is None else {"schema": schema})})
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_extract_online_answers_the_object_and_takes_a_request_schema():
    answer_text = '{"product":"kettle","sentiment":"negative"}'
    response = answer(task_of({"type": "extract", "schema": SCHEMA}), ExtractionRequest(text="x"), StandIn(answer_text))
    assert response.data == {"product": "kettle", "sentiment": "negative"} and response.text == answer_text
    own = {"type": "object", "properties": {"city": {"type": "string"}}}
    online = StandIn('{"city":"Oslo"}')
    request = ExtractionRequest.model_validate({"text": "x", "schema": own, "instructions": "Find the city."})
    response = answer(task_of({"type": "extract", "schema": SCHEMA}), request, online)
    assert response.data == {"city": "Oslo"}
    assert online.prompts[0].messages[-1]["content"].startswith("Find the city.")
    assert "- city (string, optional)" in online.prompts[0].messages[-1]["content"]
    with pytest.raises(RowError, match="invalid_output"):
        answer(task_of({"type": "extract", "schema": SCHEMA}), ExtractionRequest(text="x"), StandIn('{"city":"Oslo"}'))
    with pytest.raises(ValueError, match="object with properties"):
        ExtractionRequest.model_validate({"text": "x", "schema": {"type": "string"}})


# --- the worker's plumbing (echo engine: it answers the prompt's last words) --------------------------------------
def test_classify_rows_through_the_worker_become_typed_columns_or_invalid_output(tmp_path):
    rows = [{"id": "a", "text": "first"}, {"id": "b", "text": "second"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    def run(labels: list[str], out: str) -> EchoEngine:
        spec = JobSpec.model_validate({"input": {"path": str(tmp_path / "in.jsonl"), "id_column": "id"},
                                       "task": {"type": "classify", "labels": labels},
                                       "sampling": {"max_tokens": 1}, "output": {"path": str(tmp_path / out)}})
        engine = EchoEngine()
        run_worker(spec, engine)
        return engine

    engine = run(["assistant:", "other"], "good")  # the echo engine's answer is the prompt's last word
    assert all(extra == {"structured": {"choice": ["assistant:", "other"]}, "logprobs": 0}
               for _, _, _, extra in engine.requests)
    out = pd.read_parquet(tmp_path / "good")
    assert list(out["label"]) == ["assistant:", "assistant:"] and str(out["confidence"].dtype) == "float64"
    run(["yes", "no"], "bad")
    errors = pd.read_parquet(tmp_path / "bad" / "_errors")
    assert set(errors["error_type"]) == {"invalid_output"} and len(errors) == 2


# --- genfarm eval -----------------------------------------------------------------------------------------------
def results(tmp_path, task: dict, columns: dict) -> Ledger:
    ledger = Ledger(str(tmp_path / "out"))
    ledger.write_json(MANIFEST, {"spec": {"task": task}})
    ledger.commit(pa.table({"sample_index": [0] * len(next(iter(columns.values()))), **columns}), "p.parquet")
    ledger.commit(pa.table({"id": ["broken"]}), "p.parquet", errors=True)
    return ledger


def test_score_single_label_against_a_gold_column(tmp_path):
    ledger = results(tmp_path, {"type": "classify", "labels": ["a", "b", "c"]}, {
        "input_label": ["a", "a", "b", "b", "c", None],  # the input's `label`, kept beside the task's
        "label": ["a", "b", "b", "b", "a", "a"]})
    scores = score(ledger, "label")
    assert scores["gold_column"] == "input_label" and scores["scored_rows"] == 5
    assert (scores["unlabelled_rows"], scores["error_rows"]) == (1, 1)
    assert scores["accuracy"] == 0.6
    assert scores["per_label"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert scores["per_label"]["b"] == {"precision": 0.6667, "recall": 1.0, "f1": 0.8, "support": 2}
    assert scores["per_label"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert scores["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3, abs=1e-4)
    with pytest.raises(UserError, match=r"^--gold truth: the results have no input column 'truth'"):
        score(ledger, "truth")


def test_score_multi_label_sets(tmp_path):
    ledger = results(tmp_path, {"type": "classify", "labels": ["a", "b"], "multi_label": True}, {
        "gold": ["a", "a, b", "b", ""], "labels": [["a"], ["a"], ["b"], []]})
    scores = score(ledger, "gold")
    assert scores["accuracy"] == 0.75 and scores["per_label"]["b"]["recall"] == 0.5
    assert scores["per_label"]["a"]["f1"] == 1.0


def test_score_refuses_a_job_of_another_task(tmp_path):
    ledger = results(tmp_path, {"type": "article"}, {"title": ["x"]})
    with pytest.raises(UserError, match="holds a article job, not classify"):
        score(ledger, "label")
