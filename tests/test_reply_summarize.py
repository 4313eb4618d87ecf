"""The reply and summarize tasks on the real engine (tiny random model: its text is noise, so what is checked is
genfarm's: every row accounted for, one summary per document from its parts, the routes answering)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_job, write_jsonl
from test_serve import service  # noqa: F401 - this module's own `genfarm serve` on the tiny model (posts send its key)

from genfarm.batch.job import run_job
from genfarm.batch.source import list_inputs, source_rows
from genfarm.task import make_task

ENGINE = {"cpu_threads": 2}  # others run tests on this machine too
PARAGRAPH = ("The hive is warm in winter. Bees make honey from the nectar of flowers, and the honey keeps the "
             "colony alive until spring.")
LONG = "# Bees\n\n" + "\n\n".join(f"## Part {n}\n\n{PARAGRAPH} {PARAGRAPH}" for n in range(6))


@pytest.fixture(scope="module")
def summarized(tmp_path_factory, tiny, ray_session):
    folder = tmp_path_factory.mktemp("summarize")
    rows = [{"id": "long", "text": LONG}, {"id": "short", "text": PARAGRAPH}, {"id": "empty", "text": "  "},
            {"id": "other", "text": "Water is wet.", "language": "de"}]
    data = write_jsonl(folder / "docs.jsonl", rows)
    job = make_job(data, folder / "out", tiny, engine=ENGINE,
                   task={"type": "summarize", "length": "2 sentences", "segment": {"max_tokens": 200}})
    return job, run_job(job, show_progress=False)


def test_every_row_is_accounted_for_and_each_document_has_one_summary(summarized):
    job, summary = summarized
    out = Path(job.output.path)
    expander = make_task(job.task).expander(job, job.model.name)
    fs, files = list_inputs(job.input)
    work = [row["_gf_id"] for row in source_rows(fs, files[0], job.input, expander)]
    assert summary["status"] == "complete" and summary["input_rows"] == len(work)
    assert summary["completed_rows"] + summary["error_rows"] == len(work) and summary["error_rows"] == 1
    assert summary["documents"] == {"documents": 4, "complete": 3, "partial": 0, "failed": 1,
                                    "output": str(out / "_summaries")}
    results = pd.read_parquet(out).set_index("id")
    parts = results[results["document_id"] == "long"].sort_values("segment_index")
    assert len(parts) > 2 and list(parts.index) == [f"long/{n}" for n in range(len(parts))]
    assert (parts["segment_count"] == len(parts)).all()
    assert all(f"part {n + 1} of {len(parts)} of a longer document" in prompt
               for n, prompt in enumerate(parts["prompt"]))
    docs = pd.read_parquet(out / "_summaries").set_index("document_id")
    assert sorted(docs.index) == ["empty", "long", "other", "short"]
    long = docs.loc["long"]
    assert long["status"] == "complete" and long["segments"] == len(parts)
    assert long["text"] == "\n\n".join(t.strip() for t in parts["output_text"] if t.strip())
    assert long["prompt_tokens"] == parts["prompt_tokens"].sum()
    assert long["completion_tokens"] == parts["completion_tokens"].sum()
    assert list(long["truncated_segments"]) == [n for n, r in enumerate(parts["finish_reason"]) if r == "length"]
    assert docs.loc["short", "text"] == results.loc["short", "output_text"].strip()
    assert results.loc["short", "segment_count"] == 1 and docs.loc["short", "segments"] == 1
    assert "Write the summary in German." in results.loc["other", "prompt"]
    assert docs.loc["empty", "status"] == "failed" and docs.loc["empty", "errors"][0].startswith("empty_prompt")


def test_reply_job_on_a_conversation_column(tmp_path, tiny, ray_session):
    thread = [{"role": "user", "content": "My kettle leaks."}, {"role": "assistant", "content": "Since when?"},
              {"role": "user", "content": "Since Monday."}]
    rows = [{"id": f"c{n}", "messages": thread, "language": lang} for n, lang in enumerate(["de", None, "fr"])]
    rows.append({"id": "bad", "messages": [{"role": "bot", "content": "beep"}]})
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    job = make_job(data, tmp_path / "out", tiny, engine=ENGINE,
                   task={"type": "reply", "conversation": True, "policy": "Kettles have a 2-year warranty.",
                         "language": "en", "signature": "-- Acme"}, sampling={"max_tokens": 12})
    summary = run_job(job, show_progress=False)
    assert summary["status"] == "complete" and (summary["completed_rows"], summary["error_rows"]) == (3, 1)
    out = pd.read_parquet(tmp_path / "out").set_index("id")
    assert all(row.reply == (f"{row.output_text.strip()}\n\n-- Acme" if row.output_text.strip() else "")
               for row in out.itertuples())
    assert all("Kettles have a 2-year warranty." in p and "Customer: Since Monday." in p for p in out["prompt"])
    assert "Write it in German." in out.loc["c0", "prompt"] and "Write it in English." in out.loc["c1", "prompt"]
    errors = pd.read_parquet(tmp_path / "out" / "_errors")
    assert list(errors["error_type"]) == ["bad_type"] and "role 'bot'" in errors["message"][0]


def test_routes_answer_replies_and_summaries(service):  # noqa: F811
    reply = service.post("/v1/replies", json={"text": "Where is my parcel?", "language": "de", "temperature": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "reply" and body["reply"] == body["text"].strip() and body["language"] == "de"
    assert 0 < body["usage"]["completion_tokens"] <= 8  # the serve config's max_tokens
    conversation = service.post("/v1/replies", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert conversation.status_code == 200, conversation.text
    both = service.post("/v1/replies", json={"text": "a", "messages": [{"role": "user", "content": "b"}]})
    assert both.status_code == 400 and both.json()["error"]["param"] == "text"
    long_text = "\n\n".join([LONG] * 12)
    summary = service.post("/v1/summaries", json={"text": long_text, "length": "3 bullets", "temperature": 0})
    assert summary.status_code == 200, summary.text
    body = summary.json()
    assert body["object"] == "summary" and body["segments"] > 1
    assert body["segments"] <= body["usage"]["completion_tokens"] <= 8 * body["segments"]
    short = service.post("/v1/summaries", json={"text": PARAGRAPH})
    assert short.status_code == 200 and short.json()["segments"] == 1
    bad = service.post("/v1/summaries", json={"text": PARAGRAPH, "length": "brief"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "length"
    assert json.loads(service.post("/v1/replies", json={"text": " "}).text)["error"]["code"] == "empty_prompt"
