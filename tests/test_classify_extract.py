"""The classify and extract tasks as batch jobs on the real engine (tiny random model: its answers are noise, so what
is checked is what genfarm and guided decoding guarantee: labels from the list, answers valid against the schema, a
summary that accounts for every row)."""

from __future__ import annotations

import json

import jsonschema
import pandas as pd
import pytest
from conftest import make_job, write_jsonl

from genfarm.batch.job import run_job
from genfarm.batch.ledger import Ledger
from genfarm.tasks.classify import label_schema, score

LABELS = ["billing", "technical", "account", "other"]
# Closed values only: the random model's free strings run on, and xgrammar lets a maxLength string hold control
# characters, which JSON forbids.
SCHEMA = {"type": "object", "required": ["product", "sentiment", "urgent"], "additionalProperties": False,
          "properties": {"product": {"enum": ["kettle", "phone", "bike"]},
                         "sentiment": {"enum": ["positive", "negative"]}, "urgent": {"type": "boolean"}}}


def messages(n: int) -> list[dict]:
    return [{"id": f"m{i}", "text": f"message number {i} about bees", "label": LABELS[i % 4]} for i in range(n)]


def run(tmp_path, tiny, task: dict, rows: int, max_tokens: int, **sections) -> tuple[dict, pd.DataFrame]:
    data = write_jsonl(tmp_path / "in.jsonl", messages(rows))
    job = make_job(data, tmp_path / "out", tiny, task=task, sampling={"max_tokens": max_tokens, "temperature": 0},
                   **sections)
    summary = run_job(job, show_progress=False)
    assert summary["status"] == "complete" and summary["input_rows"] == rows
    assert summary["completed_rows"] + summary["error_rows"] == rows  # every row accounted for
    assert set(summary["errors_by_type"]) <= {"invalid_output"}
    out = pd.read_parquet(tmp_path / "out")
    assert len(out) == summary["completed_rows"]
    return summary, out


@pytest.fixture(scope="module")
def classified(tmp_path_factory, tiny, ray_session):
    tmp_path = tmp_path_factory.mktemp("classify")
    return (*run(tmp_path, tiny, {"type": "classify", "labels": LABELS}, rows=8, max_tokens=16), tmp_path / "out")


def test_classify_answers_only_labels_from_the_list(classified):
    summary, out, folder = classified
    assert summary["completed_rows"] == 8  # a choice fits in 16 tokens: no row is cut short
    assert set(out["label"]) <= set(LABELS) and (out["label"] == out["output_text"]).all()
    assert sum(summary["labels"].values()) == 8 and list(summary["labels"]) == LABELS
    scores = score(Ledger(str(folder)), "label")  # the input's `label` column, kept as input_label
    assert scores["gold_column"] == "input_label" and scores["scored_rows"] == 8
    assert 0 <= scores["accuracy"] <= 1 and set(scores["per_label"]) <= set(LABELS)


def test_classify_confidence_is_the_answers_probability(classified):
    _, out, _ = classified
    assert out["confidence"].notna().all() and ((out["confidence"] > 0) & (out["confidence"] <= 1)).all()


def test_multi_label_answers_are_sets_of_listed_labels(tmp_path, tiny):
    summary, out = run(tmp_path, tiny, {"type": "classify", "labels": LABELS, "multi_label": True}, rows=6,
                       max_tokens=96)
    assert summary["completed_rows"] == 6  # compact JSON of a fixed length: no row is cut short
    for row in out.itertuples():
        jsonschema.validate(json.loads(row.output_text), label_schema(LABELS))
        assert set(row.labels) <= set(LABELS) and len(set(row.labels)) == len(row.labels)


def test_extract_rows_validate_against_the_schema_and_fill_typed_columns(tmp_path, tiny):
    # vLLM 0.32 reads disable_any_whitespace from the engine's config only, not from a request's constraint: without
    # it the random model writes whitespace between the JSON values until max_tokens.
    compact = {"vllm": {"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}}
    summary, out = run(tmp_path, tiny, {"type": "extract", "schema": SCHEMA}, rows=6, max_tokens=96, engine=compact)
    assert summary["completed_rows"] == 6  # compact, the answer fits in 96 tokens
    for row in out.itertuples():
        jsonschema.validate(json.loads(row.output_text), SCHEMA)
        assert row.product in ("kettle", "phone", "bike") and row.sentiment in ("positive", "negative")
    assert str(out["urgent"].dtype) == "bool"
    assert summary["fields_filled"] == dict.fromkeys(SCHEMA["properties"], summary["completed_rows"])
