"""Structured outputs and quality checks on the real engine (tiny random model: its text is noise, so every
guarantee checked here is genfarm's and vLLM's guided decoding's, never the model's)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import jsonschema
import pandas as pd
import pytest
from conftest import make_job, write_jsonl
from test_failures import assert_exactly_once, committed_parts, wait_for

from genfarm.batch.job import run_job

pytestmark = pytest.mark.usefixtures("ray_session")

SCHEMA = {"type": "object", "required": ["sentiment", "urgent"], "additionalProperties": False,
          "properties": {"sentiment": {"enum": ["positive", "negative"]}, "urgent": {"type": "boolean"}}}
TEMPLATE = [{"role": "user", "content": "Review: {{ text }}\nAnswer in JSON."}]


def reviews(n: int) -> list[dict]:
    return [{"id": f"r{i:02d}", "text": f"review number {i} about bees"} for i in range(n)]


def test_json_schema_rows_validate_and_become_typed_columns(tmp_path, tiny):
    data = write_jsonl(tmp_path / "in.jsonl", reviews(12))
    job = make_job(data, tmp_path / "out", tiny, task={"type": "template", "messages": TEMPLATE, "schema": SCHEMA},
                   sampling={"max_tokens": 48})
    summary = run_job(job, show_progress=False)
    assert summary["status"] == "complete" and summary["input_rows"] == 12
    out = pd.read_parquet(tmp_path / "out")
    assert summary["completed_rows"] == len(out) and summary["completed_rows"] + summary["error_rows"] == 12
    assert len(out) > 0
    for row in out.itertuples():
        jsonschema.validate(json.loads(row.output_text), SCHEMA)  # guided decoding held
        assert row.sentiment in ("positive", "negative") and isinstance(row.urgent, bool)
    assert str(out["urgent"].dtype) == "bool"


def test_choice_rows_are_in_the_list(tmp_path, tiny):
    data = write_jsonl(tmp_path / "in.jsonl", reviews(10))
    job = make_job(data, tmp_path / "out", tiny, sampling={"max_tokens": 8},
                   task={"type": "template", "messages": TEMPLATE, "choices": ["spam", "ham", "unsure"]})
    summary = run_job(job, show_progress=False)
    out = pd.read_parquet(tmp_path / "out")
    assert summary["completed_rows"] == 10 and set(out["output_text"]) <= {"spam", "ham", "unsure"}


def test_schema_that_does_not_fit_max_tokens_becomes_invalid_output_rows(tmp_path, tiny):
    data = write_jsonl(tmp_path / "in.jsonl", reviews(6))
    job = make_job(data, tmp_path / "out", tiny, sampling={"max_tokens": 3},
                   task={"type": "template", "messages": TEMPLATE, "schema": SCHEMA})
    summary = run_job(job, show_progress=False)
    assert summary["status"] == "complete"  # the job ends normally: every row accounted for
    assert summary["errors_by_type"] == {"invalid_output": 6} and summary["completed_rows"] == 0
    errors = pd.read_parquet(tmp_path / "out" / "_errors")
    assert errors["message"].str.contains("not JSON").all()


def test_truncated_texts_are_regenerated_with_more_room_then_trimmed(tmp_path, tiny):
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": f"t{i}", "topic": f"topic {i}"} for i in range(8)])
    job = make_job(data, tmp_path / "out", tiny, sampling={"max_tokens": 8, "temperature": 0},
                   quality={"retries": 1, "truncated": "regenerate", "repetition": False})
    summary = run_job(job, show_progress=False)
    out = pd.read_parquet(tmp_path / "out")
    assert summary["completed_rows"] == 8 and len(out) == 8  # a regenerated row is still one row
    assert (out["attempts"] == 2).all()  # greedy, the random model stops neither within 8 tokens nor within 12
    assert (out["sampling"].map(lambda s: s["max_tokens"]) == 12).all()  # the second try had 1.5x the room
    assert summary["quality"]["regenerated_rows"] == 8
    trimmed = out[out["quality_fixes"].map(lambda fixes: "trimmed" in fixes)]
    assert summary["quality"]["fixes"].get("trimmed", 0) == len(trimmed)
    still_cut = out[out["quality"].map(lambda failed: "truncated" in failed)]
    assert len(trimmed) + len(still_cut) == 8  # each cut text is either trimmed or flagged, never silently cut
    assert all(text.rstrip()[-1] in ".!?…" for text in trimmed["output_text"])


def test_failed_checks_can_be_error_rows(tmp_path, tiny):
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": f"t{i}", "topic": f"topic {i}"} for i in range(4)])
    job = make_job(data, tmp_path / "out", tiny, sampling={"max_tokens": 6},
                   quality={"min_words": 1000, "on_failure": "error", "truncated": "off"})
    summary = run_job(job, show_progress=False)
    assert summary["errors_by_type"] == {"quality": 4} and summary["status"] == "complete"
    assert pd.read_parquet(tmp_path / "out" / "_errors")["message"].str.contains("min_words").all()


def test_driver_killed_during_regenerations_still_ends_exactly_once(tmp_path, tiny):
    rows = [{"id": f"t{i:03d}", "topic": f"topic {i}"} for i in range(160)]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {{path: {data}, id_column: id}}\ntask: {{type: article}}\nmodel: {{name: {tiny}}}\n"
                   "engine: {max_model_len: 512, kv_cache_gib: 0.25}\nsampling: {max_tokens: 24}\n"
                   "quality: {retries: 2, truncated: regenerate}\n"
                   f"workers: {{batch_size: 8}}\noutput: {{path: {tmp_path / 'out'}}}\n")
    command = [sys.executable, "-m", "genfarm", "run", str(job), "--no-progress", "--json"]
    out = tmp_path / "out"
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(committed_parts(out)) >= 2 or driver.poll() is not None, what="two committed parts")
    assert driver.poll() is None, "the job ended before it could be stopped"
    driver.send_signal(signal.SIGKILL)  # every batch in flight is in the middle of its regenerations
    driver.communicate(timeout=120)
    again = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    assert_exactly_once(out, [r["id"] for r in rows])
    assert (pd.read_parquet(out)["attempts"] > 1).mean() > 0.8  # the kill hit regenerations
