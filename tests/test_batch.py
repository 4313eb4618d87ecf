"""Batch jobs end to end on real Ray Data + the real vLLM engine (tiny offline model)."""

from __future__ import annotations

import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_job, topics, write_jsonl

from genfarm.batch.job import run_job
from genfarm.errors import UserError

pytestmark = pytest.mark.usefixtures("ray_session")


def results(output) -> pd.DataFrame:
    return pd.read_parquet(output)


def errors(output) -> pd.DataFrame:
    return pd.read_parquet(os.path.join(output, "_errors"))


def test_article_job_writes_every_row_with_provenance(tmp_path, tiny):
    data = write_jsonl(tmp_path / "topics.jsonl", topics(40))
    summary = run_job(make_job(data, tmp_path / "out", tiny), show_progress=False)
    df = results(tmp_path / "out")
    assert summary["status"] == "complete"
    assert (summary["input_rows"], summary["completed_rows"], summary["error_rows"]) == (40, 40, 0)
    assert sorted(df["id"]) == [f"t{i:03d}" for i in range(40)]
    merged = summary["compacted_parts"]  # a part per batch of 8 while the job ran, merged when it ended
    assert merged["before"] >= 5 and merged["after"] == 1
    assert len([p for p in os.listdir(tmp_path / "out") if p.endswith(".parquet")]) == 1
    for column in ("topic", "prompt", "output_text", "title", "sample_index", "finish_reason", "prompt_tokens",
                   "completion_tokens", "model", "model_revision", "sampling", "job_id", "worker_id", "node_id",
                   "source_file", "source_row", "started_at", "finished_at"):
        assert column in df.columns, column
    assert df["completion_tokens"].between(1, 16).all()
    assert summary["completion_tokens"] == df["completion_tokens"].sum()
    assert df["finish_reason"].isin(["length", "stop"]).all()
    assert (df.loc[df.finish_reason == "length", "completion_tokens"] == 16).all()
    assert df["prompt"].str.contains("topic number").all()
    assert df["model"].eq(tiny).all() and df["model_revision"].str.startswith("local-").all()
    assert df["sampling"].map(lambda s: s["max_tokens"]).eq(16).all()
    # the prompt token count is the chat-templated prompt's real length
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny)
    row = df.iloc[0]
    assert row["prompt_tokens"] == len(tok.encode(row["prompt"], add_special_tokens=False))


def test_fixed_seed_reproduces_text_and_other_seed_differs(tmp_path, tiny):
    data = write_jsonl(tmp_path / "topics.jsonl", topics(12))
    for name, seed, batch in (("a", 5, 4), ("b", 5, 12), ("c", 6, 4)):
        run_job(make_job(data, tmp_path / name, tiny, sampling={"seed": seed}, workers={"batch_size": batch}),
                show_progress=False)
    a, b, c = (results(tmp_path / n).set_index("id").sort_index()["output_text"] for n in "abc")
    assert a.equals(b)  # same seed, different batching: same text
    assert not a.equals(c)


def test_n_samples_per_prompt(tmp_path, tiny):
    data = write_jsonl(tmp_path / "topics.jsonl", topics(5))
    summary = run_job(make_job(data, tmp_path / "out", tiny, sampling={"n": 3}), show_progress=False)
    df = results(tmp_path / "out")
    assert summary["samples"] == 15 and summary["completed_rows"] == 5
    assert all(sorted(v) == [0, 1, 2] for v in df.groupby("id")["sample_index"].apply(list))


def test_bad_rows_become_typed_errors_and_counts_balance(tmp_path, tiny):
    rows = topics(6) + [
        {"id": "no-topic"},
        {"id": "number", "topic": 12345},
        {"id": "empty", "topic": "   "},
        {"id": "long", "topic": "word " * 2000},
        '{"id": "broken", "topic": ',
        '["a", "list"]',
        {"topic": "no id at all"},
        {"id": "t000", "topic": "a repeated id"},
    ]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    summary = run_job(make_job(data, tmp_path / "out", tiny), show_progress=False)
    err = errors(tmp_path / "out")
    assert summary["input_rows"] == 14
    assert summary["completed_rows"] + summary["error_rows"] == 14
    assert summary["completed_rows"] == 6
    assert summary["errors_by_type"] == {"missing_field": 2, "bad_type": 1, "empty_prompt": 1,
                                         "prompt_too_long": 1, "bad_json": 2, "duplicate_id": 1}
    by_id = err.set_index("id")["error_type"].to_dict()
    assert by_id["no-topic"] == "missing_field" and by_id["number"] == "bad_type"
    assert by_id["long"] == "prompt_too_long" and by_id["empty"] == "empty_prompt"
    assert err["message"].str.len().gt(0).all() and err["input"].str.len().gt(0).all()


def test_long_prompts_can_be_truncated(tmp_path, tiny):
    data = write_jsonl(tmp_path / "long.jsonl", [{"id": "long", "topic": "word " * 2000}])
    summary = run_job(make_job(data, tmp_path / "out", tiny, engine={"long_prompts": "truncate"}),
                      show_progress=False)
    assert summary["completed_rows"] == 1
    assert results(tmp_path / "out")["prompt_tokens"].iloc[0] <= 512 - 16


def test_resume_generates_only_missing_rows_and_never_repeats_one(tmp_path, tiny):
    data = write_jsonl(tmp_path / "topics.jsonl", topics(40))
    out = tmp_path / "out"
    job = make_job(data, out, tiny, workers={"batch_size": 8}, output={"compact": False})  # a part per batch
    run_job(job, show_progress=False)
    parts = sorted(p for p in os.listdir(out) if p.endswith(".parquet"))
    assert len(parts) >= 5  # at least one per batch of 8
    kept = {p: os.stat(out / p).st_mtime_ns for p in parts[2:]}
    lost = set(pq.read_table(out / parts[0])["id"].to_pylist() + pq.read_table(out / parts[1])["id"].to_pylist())
    for p in parts[:2]:
        os.remove(out / p)  # as if the job had died before committing these
    summary = run_job(job, show_progress=False)
    df = results(out)
    assert summary["status"] == "complete" and len(df) == 40 and df["id"].is_unique
    assert {p: os.stat(out / p).st_mtime_ns for p in kept} == kept  # committed parts untouched
    assert summary["run_completion_tokens"] == df[df["id"].isin(lost)]["completion_tokens"].sum()


def test_changed_sampling_is_refused_and_restart_keeps_old_results(tmp_path, tiny):
    data = write_jsonl(tmp_path / "topics.jsonl", topics(4))
    out = tmp_path / "out"
    run_job(make_job(data, out, tiny), show_progress=False)
    with pytest.raises(UserError, match="sampling.temperature"):
        run_job(make_job(data, out, tiny, sampling={"temperature": 0.2}), show_progress=False)
    summary = run_job(make_job(data, out, tiny, sampling={"temperature": 0.2}), restart=True, show_progress=False)
    assert summary["completed_rows"] == 4 and len(results(out)) == 4
    previous = [p for p in os.listdir(out / "_genfarm") if p.startswith("previous-")]
    assert len(previous) == 1
    assert len(pd.read_parquet(out / "_genfarm" / previous[0])) == 4


def test_translate_from_csv_with_per_row_languages(tmp_path, tiny):
    csv = tmp_path / "s.csv"
    csv.write_text('id,text,target\n1,"Hello, world",French\n2,Good night,German\n3,"broken,row",x,y\n')
    job = make_job(csv, tmp_path / "out", tiny,
                   task={"type": "translate", "source_language": "English", "columns": {"target_language": "target"}})
    summary = run_job(job, show_progress=False)
    df = results(tmp_path / "out").set_index("id")
    assert summary["completed_rows"] == 2 and summary["errors_by_type"] == {"bad_row": 1}
    assert df.loc["1", "target_language"] == "French" and df.loc["2", "target_language"] == "German"
    assert "Hello, world" in df.loc["1", "prompt"] and "to French" in df.loc["1", "prompt"]


def test_template_over_parquet_folder_with_derived_ids(tmp_path, tiny):
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"name": ["ada", "alan"], "lang": ["English", "French"]}), folder / "a.parquet")
    pq.write_table(pa.table({"name": ["grace"], "lang": ["German"]}), folder / "b.parquet")
    job = make_job(folder, tmp_path / "out", tiny, input={"id_column": None},
                   task={"type": "template", "prompt": "Say hello to {{ name }} in {{ lang | upper }}:"})
    run_job(job, show_progress=False)
    df = results(tmp_path / "out").set_index("id").sort_index()
    assert list(df.index) == ["a.parquet:0", "a.parquet:1", "b.parquet:0"]
    assert df.loc["b.parquet:0", "prompt"] == "Say hello to grace in GERMAN:"


def test_generation_past_the_request_timeout_is_a_timeout_row(tmp_path, tiny):
    data = write_jsonl(tmp_path / "topics.jsonl", topics(6))
    job = make_job(data, tmp_path / "out", tiny, engine={"request_timeout_s": 0.05, "max_model_len": 4096},
                   sampling={"max_tokens": 3000, "temperature": 0})
    summary = run_job(job, show_progress=False)
    assert summary["status"] == "complete"
    assert summary["completed_rows"] + summary["error_rows"] == 6
    assert summary["errors_by_type"].get("timeout", 0) >= 1
    timeouts = errors(tmp_path / "out").query("error_type == 'timeout'")
    assert timeouts["message"].str.contains("engine.request_timeout_s").all()


def test_template_that_fails_on_a_row_is_an_invalid_template_row(tmp_path, tiny):
    data = write_jsonl(tmp_path / "n.jsonl", [{"id": "ok", "x": 2}, {"id": "zero", "x": 0}])
    job = make_job(data, tmp_path / "out", tiny,
                   task={"type": "template", "messages": [{"role": "user", "content": "{{ 10 // x }} apples"}]})
    summary = run_job(job, show_progress=False)
    assert summary["completed_rows"] == 1 and summary["errors_by_type"] == {"invalid_template": 1}
    assert "ZeroDivisionError" in errors(tmp_path / "out")["message"].iloc[0]


@pytest.mark.parametrize("window", [4096, 0])
def test_rows_sharing_a_prefix_run_together_and_the_summary_counts_prefix_cache_hits(tmp_path, tiny, window):
    """Six documents with eight questions each, shuffled: ordered by prompt (workers.prefix_window), each document's
    questions run in one or two batches of eight (Ray Data cuts batches from the ordered rows, not at documents),
    where the engine's prefix cache computes the document once; in the input's order (0) they are spread wider."""
    import random

    rows = [{"id": f"d{d}-q{q}", "question": f"question {q} about it?",
             "document": f"{d} " + " ".join(["the history of water and music in English"] * 20)}
            for d in range(6) for q in range(8)]
    random.Random(3).shuffle(rows)
    data = write_jsonl(tmp_path / "questions.jsonl", rows)
    task = {"type": "template", "messages": [{"role": "user", "content": "{{ document }}\n{{ question }}"}]}
    job = make_job(data, tmp_path / "out", tiny, task=task, engine={"max_model_len": 1024},
                   sampling={"max_tokens": 4}, workers={"batch_size": 8, "prefix_window": window})
    summary = run_job(job, show_progress=False)
    df = results(tmp_path / "out")
    assert summary["completed_rows"] == 48 and df["id"].is_unique
    cache = summary["run_prefix_cache"]
    assert cache["prompt_tokens"] == df["prompt_tokens"].sum() and 0 <= cache["cached_tokens"] < cache["prompt_tokens"]
    batches_per_document = df.assign(document=df["id"].str[:2]).groupby("document")["started_at"].nunique()
    if window:
        assert batches_per_document.max() <= 2, batches_per_document
        assert cache["hit_rate"] >= 0.5, cache  # the document, computed once for its first question
    else:
        assert batches_per_document.max() > 2, batches_per_document
