"""The batch pipeline's plumbing in-process: source rows and ids, the worker's row and column building (with an echo
engine, no model), the ledger's parts, done ids and retries, and a task's expander and parse hooks."""

from __future__ import annotations

import json
import os
from typing import Literal

import pandas as pd
import pyarrow as pa
import pytest
from echo_engine import EchoEngine

from genfarm.batch.ledger import Ledger, source_key
from genfarm.batch.source import infer_schema, list_inputs, source_rows, to_block
from genfarm.batch.worker import GenerateWorker
from genfarm.models import ResolvedModel
from genfarm.rows import Prompt, RowError, text_field
from genfarm.spec import JobSpec, TaskConfig
from genfarm.task import RowSampling, Task

MODEL = ResolvedModel("echo", "/nowhere", "none")


class SplitConfig(TaskConfig):
    type: Literal["unit-split"]


class Split(Task):
    """Each input row's sentences become work rows; a sentence saying 'broken' fails in parse."""

    Config = SplitConfig
    output_columns = {"sentence_no": pa.int32()}

    def required_columns(self) -> list[str]:
        return ["text"]

    def prompt(self, row: dict) -> Prompt:
        return Prompt(text=text_field(row, "text", {}))

    def sampling(self, row: dict) -> RowSampling:
        return RowSampling(max_tokens=3, structured={"choice": ["a", "b"]})

    def parse(self, row: dict, text: str) -> dict:
        if "broken" in text:
            raise RowError("bad_type", "a broken answer")
        return {"sentence_no": json.loads(row["_gf_task"])["n"]}

    def expander(self, job, model_path):
        return SentenceExpander()


class SentenceExpander:
    def expand(self, row: dict) -> list[dict]:
        if row["_gf_error"]:
            return [row]
        sentences = [s.strip() for s in row["text"].split(".") if s.strip()]
        return [{**row, "text": s, "_gf_id": f"{row['_gf_id']}/{n}", "_gf_task": json.dumps({"n": n})}
                for n, s in enumerate(sentences)]


def job_for(tmp_path, rows: list, task: dict) -> JobSpec:
    data = tmp_path / "in.jsonl"
    data.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return JobSpec.model_validate({"input": {"path": str(data), "id_column": "id"}, "task": task,
                                   "sampling": {"max_tokens": 4, "seed": 1}, "output": {"path": str(tmp_path / "out")}})


def run_worker(job: JobSpec, engine: EchoEngine, run_id: str = "run-1") -> dict:
    """What one engine actor does with every row of the input, as one batch."""
    from genfarm.task import make_task

    fs, files = list_inputs(job.input)
    schema = infer_schema(fs, files[0])
    expander = make_task(job.task).expander(job, "")
    rows = [row for file in files for row in source_rows(fs, file, job.input, expander)]
    Ledger(job.output.path).start_run(run_id, "now")
    worker = GenerateWorker(job, MODEL, False, schema, "job-1", run_id, engine=engine)
    return worker(to_block(rows, schema)).to_pylist()[0]


def test_article_rows_become_results_and_bad_rows_typed_errors(tmp_path):
    job = job_for(tmp_path, [{"id": "a", "topic": "bees"}, {"id": "b", "topic": ""}, "{not json",
                             {"id": "a", "topic": "again"}, {"id": "c", "topic": 7}], {"type": "article"})
    stats = run_worker(job, EchoEngine())
    assert (stats["rows"], stats["results"], stats["errors"]) == (5, 1, 4)
    out = pd.read_parquet(tmp_path / "out")
    errors = pd.read_parquet(tmp_path / "out" / "_errors").set_index("source_row")
    assert list(out["id"]) == ["a"] and out["output_text"][0] == "then the article. assistant:"  # last 4 words
    assert out["sampling"][0]["max_tokens"] == 4 and out["title"][0] == ""
    assert dict(errors["error_type"]) == {1: "empty_prompt", 2: "bad_json", 3: "duplicate_id", 4: "bad_type"}


def test_expander_work_rows_per_row_sampling_and_parse_errors(tmp_path):
    job = job_for(tmp_path, [{"id": "d1", "text": "One two. Three broken. Four."}], {"type": "unit-split"})
    engine = EchoEngine()
    stats = run_worker(job, engine)
    assert (stats["rows"], stats["results"], stats["errors"]) == (3, 2, 1)
    out = pd.read_parquet(tmp_path / "out").sort_values("id")
    assert list(out["id"]) == ["d1/0", "d1/2"] and list(out["sentence_no"]) == [0, 2]
    assert str(out["sentence_no"].dtype) == "int32" and "_gf_task" not in out.columns
    assert out["sampling"].iloc[0]["max_tokens"] == 3  # the task's own budget, recorded
    assert all(spec.max_tokens == 3 and extra["structured"] == {"choice": ["a", "b"]}
               for _, spec, _, extra in engine.requests)
    errors = pd.read_parquet(tmp_path / "out" / "_errors")
    assert list(errors["id"]) == ["d1/1"] and list(errors["error_type"]) == ["bad_type"]


def test_ledger_knows_what_is_done_and_retries_error_rows(tmp_path):
    job = job_for(tmp_path, [{"id": f"r{i}", "topic": "x" if i % 2 else ""} for i in range(6)], {"type": "article"})
    run_worker(job, EchoEngine())
    ledger = Ledger(job.output.path)
    key = source_key("in.jsonl")
    assert ledger.done_ids(key) == {f"r{i}" for i in range(6)}
    assert (ledger.count().completed, ledger.count().errors) == (3, 3)
    assert ledger.value_counts("error_type", errors=True) == {"empty_prompt": 3}
    assert ledger.read(["id"], errors=True, limit=2).num_rows == 2
    assert ledger.take_errors(["empty_prompt"], "t1") == 3
    assert ledger.done_ids(key) == {"r1", "r3", "r5"} and ledger.count().errors == 0
    assert os.listdir(tmp_path / "out" / "_genfarm" / "retried-t1")  # kept aside, never lost
    assert not os.listdir(tmp_path / "out" / "_genfarm" / "tmp")  # no half-written part left


def test_a_worker_of_an_older_run_does_not_commit(tmp_path):
    job = job_for(tmp_path, [{"id": "a", "topic": "bees"}], {"type": "article"})
    fs, files = list_inputs(job.input)
    schema = infer_schema(fs, files[0])
    ledger = Ledger(job.output.path)
    ledger.start_run("old", "then")
    worker = GenerateWorker(job, MODEL, False, schema, "job-1", "old", engine=EchoEngine())
    ledger.start_run("new", "now")
    with pytest.raises(RuntimeError, match="a newer run"):
        worker(to_block(list(source_rows(fs, files[0], job.input)), schema))
    assert ledger.count().completed == 0


class RecordingSink:
    def __init__(self):
        self.names: list[tuple[str, bool]] = []

    def write(self, table, name, errors):
        self.names.append((name, errors))
        return name


def test_extra_sinks_write_before_the_parquet_record(tmp_path):
    sink = RecordingSink()
    ledger = Ledger(str(tmp_path / "out"), sinks=[sink])
    ledger.commit(pa.table({"id": ["x"]}), "k-000000000-abc.parquet")
    assert sink.names == [("k-000000000-abc.parquet", False)]
    assert ledger.done_ids("k") == {"x"}


class CountingEcho(EchoEngine):
    def __init__(self):
        super().__init__()
        self.generated = 0

    def generate(self, prompts, sampling, seeds, extras=None) -> list:
        self.generated += len(prompts)
        return super().generate(prompts, sampling, seeds, extras)


def test_identical_greedy_prompts_are_generated_once_each_row_its_own_result(tmp_path):
    rows = [{"id": f"r{i}", "topic": "bees" if i % 3 else "wasps"} for i in range(9)]
    job = job_for(tmp_path, rows, {"type": "article"})
    greedy = job.model_copy(update={"sampling": job.sampling.model_copy(update={"temperature": 0.0})})
    engine = CountingEcho()
    stats = run_worker(greedy, engine)
    assert engine.generated == 2 and stats["reused"] == 7  # two distinct prompts, nine rows
    out = pd.read_parquet(tmp_path / "out")
    assert sorted(out["id"]) == [f"r{i}" for i in range(9)]
    sampled = CountingEcho()  # with temperature > 0 every row is its own sample
    (tmp_path / "sampled").mkdir()
    run_worker(job_for(tmp_path / "sampled", rows, {"type": "article"}), sampled)
    assert sampled.generated == 9


def test_a_retried_batch_whose_rows_change_sides_leaves_each_row_once(tmp_path):
    """An actor that dies after committing is retried on the same batch (the same part name); if a row was an error
    the first time and a result now, or the other way round, the folder still holds it once."""
    job = job_for(tmp_path, [{"id": "a", "topic": "bees"}, {"id": "b", "topic": "wasps"}], {"type": "article"})
    job = job.model_copy(update={"sampling": job.sampling.model_copy(update={"max_tokens": 500})})  # echo it all
    store = Ledger(job.output.path)
    run_worker(job, EchoEngine(fail_on="wasps"))  # b fails: one result part, one error part
    assert (store.count().completed, store.count().errors) == (1, 1)
    run_worker(job, EchoEngine())  # the retry: both results
    assert (store.count().completed, store.count().errors) == (2, 0)
    run_worker(job, EchoEngine(fail_on="Write"))  # and both errors
    assert (store.count().completed, store.count().errors) == (0, 2)


def test_identical_greedy_prompts_are_answered_once_even_when_the_cache_turns_over():
    from genfarm.batch.attempts import GreedyAnswers
    from genfarm.spec import SamplingSpec

    engine, answers = EchoEngine(), GreedyAnswers(size=2)
    greedy = SamplingSpec(temperature=0, max_tokens=2)

    def ask(*prompts: str):
        ids = [engine.encode(p, 2) for p in prompts]
        return answers.generate(engine, ids, [greedy] * len(ids), [None] * len(ids), [{}] * len(ids))

    ask("a one", "a two")
    # "a one" is known when the call starts, and pushed out by the two new answers before the call ends
    results, reused = ask("a one", "a three", "a four", "a one")
    assert [r.completions[0].text for r in results] == ["a one", "a three", "a four", "a one"] and reused == 2
    assert len(engine.requests) == 4  # a one, a two, a three, a four: each generated once


def test_a_trimmed_text_the_task_cannot_read_stays_whole_and_flagged():
    """Trimming a cut text back to its last sentence must not fail the batch when the task's parse refuses the
    trimmed text (a structured answer cut short): the text stays as generated, flagged truncated."""
    from genfarm.batch.attempts import Sample, finish
    from genfarm.engine import Completion
    from genfarm.quality import Checks
    from genfarm.spec import SamplingSpec

    class EndsWithMarker(Split):
        trimmable = True

        def parse(self, row: dict, text: str) -> dict:
            if not text.endswith("marker"):
                raise RowError("invalid_output", "no marker")
            return {}

    cut = Completion("One sentence. Two sentences, then the marker", "length", 9, 0)
    sample = Sample(cut, {}, ["truncated"], None, 1, SamplingSpec())
    finish(EndsWithMarker(SplitConfig(type="unit-split")), {}, sample, Checks("trim", *[None] * 6))
    assert sample.completion.text == cut.text and sample.failed == ["truncated"] and sample.fixes == []
