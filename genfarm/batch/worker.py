"""The engine actor of a batch job: render prompts, generate, commit parts, report a small stats row.

Ray Data creates one of these per actor, so each holds one vLLM engine for its whole life. Output never passes
through the driver: the actor commits its own parts and hands back only counts for the progress display.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone

import pyarrow as pa

from genfarm.batch.attempts import GreedyAnswers, Sample, Work, generate_checked
from genfarm.batch.ledger import Ledger, part_name, source_key
from genfarm.batch.progress import report_tokens
from genfarm.batch.source import META_COLUMNS
from genfarm.engine import ChatTemplateRefused, Engine, EngineDead, PromptTooLong
from genfarm.models import ResolvedModel
from genfarm.quality import checks_in_force
from genfarm.rows import RowError
from genfarm.spec import JobSpec, SamplingSpec
from genfarm.task import RowSampling, make_task

ERROR_SCHEMA = pa.schema([
    ("id", pa.string()), ("error_type", pa.string()), ("message", pa.string()), ("input", pa.string()),
    ("source_file", pa.string()), ("source_row", pa.int64()), ("job_id", pa.string()),
    ("worker_id", pa.string()), ("node_id", pa.string()), ("failed_at", pa.timestamp("ms", tz="UTC")),
])
STATS_SCHEMA = pa.schema([
    ("rows", pa.int64()), ("results", pa.int64()), ("errors", pa.int64()),
    ("completion_tokens", pa.int64()), ("flagged", pa.int64()),
    ("reused", pa.int64()),  # greedy answers given again to an identical prompt instead of generated again
    ("engine_prompt_tokens", pa.int64()),  # prompt tokens the engine took (every attempt), and those its prefix
    ("cached_prompt_tokens", pa.int64()),  # cache already held
])
SAMPLING_TYPE = pa.struct([("temperature", pa.float64()), ("top_p", pa.float64()), ("max_tokens", pa.int64()),
                           ("n", pa.int64()), ("seed", pa.int64()), ("stop", pa.list_(pa.string()))])
GENERATED_FIELDS = [
    ("prompt", pa.string()), ("output_text", pa.string()), ("sample_index", pa.int32()),
    ("finish_reason", pa.string()), ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32()),
    ("quality", pa.list_(pa.string())),  # the quality checks the text still fails (empty: it passed them all)
    ("quality_fixes", pa.list_(pa.string())),  # what was done to the text ("trimmed")
    ("attempts", pa.int32()),  # generations it took (more than 1: regenerated after a failed check)
]
PROVENANCE_FIELDS = [
    ("model", pa.string()), ("model_revision", pa.string()), ("sampling", SAMPLING_TYPE), ("job_id", pa.string()),
    ("worker_id", pa.string()), ("node_id", pa.string()), ("source_file", pa.string()), ("source_row", pa.int64()),
    ("started_at", pa.timestamp("ms", tz="UTC")), ("finished_at", pa.timestamp("ms", tz="UTC")),
]

OWN_COLUMNS = {"id", *(name for name, _ in GENERATED_FIELDS), *(name for name, _ in PROVENANCE_FIELDS)}


def output_schema(input_schema: pa.Schema, task_columns: dict[str, pa.DataType]) -> tuple[pa.Schema, dict[str, str]]:
    """Result columns, and how input columns are renamed where they collide with genfarm's own or the task's."""
    own = OWN_COLUMNS | set(task_columns)
    taken = own | set(input_schema.names)
    rename = {}
    for name in input_schema.names:
        new = name
        while new in own or (new != name and new in taken):  # input_X, or input_input_X where input has input_X
            new = f"input_{new}"
        rename[name] = new
        taken.add(new)
    fields = [pa.field("id", pa.string())]
    fields += [pa.field(rename[f.name], f.type) for f in input_schema]
    fields += [pa.field(n, t) for n, t in GENERATED_FIELDS]
    fields += [pa.field(n, t) for n, t in task_columns.items()]
    fields += [pa.field(n, t) for n, t in PROVENANCE_FIELDS]
    return pa.schema(fields), rename


def row_sampling(base: SamplingSpec, wanted: RowSampling | None) -> tuple[SamplingSpec, dict, int | None]:
    """The job's sampling with a task's changes for one row, the row's further engine parameters, its own seed."""
    if wanted is None:
        return base, {}, None
    changes = {"max_tokens": wanted.max_tokens, "stop": list(wanted.stop) if wanted.stop is not None else None,
               "temperature": wanted.temperature, "top_p": wanted.top_p, "n": wanted.n}
    changed = base.model_copy(update={k: v for k, v in changes.items() if v is not None})
    return changed, wanted.engine_extra(), wanted.seed


def now() -> datetime:
    return datetime.now(timezone.utc)


class GenerateWorker:
    def __init__(self, job: JobSpec, model: ResolvedModel, gpu: bool, input_schema: pa.Schema, job_id: str,
                 run_id: str, engine=None, live_tokens=None):
        """`engine` replaces the vLLM engine only in genfarm's plumbing tests and pipeline benchmark (an echo engine,
        named as such);
        `live_tokens` is the job's LiveTokens actor, told of the engine's tokens as they are generated."""
        import ray

        self.job, self.model, self.job_id, self.run_id = job, model, job_id, run_id
        self.task = make_task(job.task)
        self.ledger = Ledger(job.output.path, sinks=self.task.sinks(job.output.path))
        self.schema, self.rename = output_schema(input_schema, self.task.output_schema())
        if ray.is_initialized():
            context = ray.get_runtime_context()
            self.node_id, self.worker_id = context.get_node_id(), context.get_actor_id() or "driver"
        else:
            self.node_id, self.worker_id = "local", "driver"
        self.checks = checks_in_force(job.quality, self.task.quality_defaults)
        self.answers = GreedyAnswers()
        self.engine = engine or Engine(model, job.engine, gpu)
        self._prefill_lock, self._prefill_reported = threading.Lock(), (0, 0)
        if live_tokens is not None:
            threading.Thread(target=report_tokens, args=(self.engine, live_tokens, threading.Event()),
                             name="genfarm-live-tokens", daemon=True).start()

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = now()
        rows = batch.to_pylist()
        errors: list[dict] = []
        works: list[Work] = []
        for row in rows:
            try:
                if row["_gf_error"]:
                    raise RowError.parse(row["_gf_error"])
                prompt = self.task.prompt(row)
                sampling, extra, seed = row_sampling(self.job.sampling, self.task.sampling(row))
                try:
                    text = self.engine.render(prompt.messages, prompt.text)
                except ChatTemplateRefused as err:
                    raise RowError("chat_template", str(err)) from None
                works.append(Work(row, text, self.engine.encode(text, sampling.max_tokens), sampling, extra, seed))
            except RowError as err:
                errors.append(self._error(row, err.kind, err.message))
            except PromptTooLong as err:
                errors.append(self._error(row, "prompt_too_long", str(err)))
        try:
            reused = generate_checked(self.engine, self.task, works, self.job.sampling.seed, self.checks,
                                      self.job.quality, self.job.engine.max_model_len, self.answers)
        except EngineDead as err:
            # Replace the engine the only safe way: let this actor die so Ray restarts it with a fresh one and
            # retries the batch there (bounded by workers.max_retries). The cause goes to the actor's log first.
            logging.getLogger("genfarm").error("engine actor exits: %r", err.__cause__ or err)
            os._exit(1)
        finished = now()
        results: list[dict] = []
        for work in works:
            failure = self._failure(work)
            if failure is not None:
                errors.append(self._error(work.row, *failure))
                continue
            for sample in work.samples:
                results.append(self._result(work, sample, started, finished))
        self._check_run()
        commit(self.ledger, rows, results, errors, self.schema)
        return stats_row(len(rows), results, errors, sum(w.generated_tokens for w in works),
                         reused, self._prefill_since_last())

    def _prefill_since_last(self) -> tuple[int, int]:
        """The engine's prompt tokens (and prefix-cached ones) since the last batch reported them. Batches run
        concurrently, so one batch's figure may hold another's requests; the job's sums are exact all the same."""
        with self._prefill_lock:
            now_seen = (self.engine.prompt_tokens_seen, self.engine.prompt_tokens_cached)
            since = (now_seen[0] - self._prefill_reported[0], now_seen[1] - self._prefill_reported[1])
            self._prefill_reported = now_seen
        return since

    def _failure(self, work: Work) -> tuple[str, str] | None:
        """(error type, message) when a row ends as an error row rather than results."""
        if isinstance(work.failure, TimeoutError):
            return "timeout", str(work.failure)
        if work.failure is not None:
            return "engine_error", f"{type(work.failure).__name__}: {work.failure}"
        refused = next((s.error for s in work.samples if s.error is not None), None)
        if refused is not None:  # no attempt parsed: the text is not what the task asked for
            return refused.kind, f"{refused.message} (after {work.attempts} attempts)" if work.attempts > 1 else \
                refused.message
        failed = sorted({name for s in work.samples for name in s.failed})
        if failed and self.job.quality.on_failure == "error":
            return "quality", f"failed the checks {', '.join(failed)} on each of {work.attempts} attempts"
        return None

    def _check_run(self) -> None:
        """A worker that outlived its driver must not commit beside the rows of a newer run: it stops here."""
        current = self.ledger.current_run()
        if current != self.run_id:
            raise RuntimeError(f"a newer run ({current}) of this job owns {self.ledger.uri}; this worker stops")

    def _result(self, work: Work, sample: Sample, started: datetime, finished: datetime) -> dict:
        row, completion, sampling = work.row, sample.completion, sample.sampling
        out = {"id": row["_gf_id"]}
        out.update({self.rename[k]: v for k, v in row.items() if k not in META_COLUMNS})
        out.update(sample.columns)
        out.update({
            "prompt": work.prompt, "output_text": completion.text, "sample_index": completion.index,
            "finish_reason": completion.finish_reason, "prompt_tokens": work.prompt_tokens,
            "completion_tokens": completion.completion_tokens, "quality": sample.failed,
            "quality_fixes": sample.fixes, "attempts": work.attempts, "model": self.model.name,
            "model_revision": self.model.revision,
            "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p,
                         "max_tokens": sampling.max_tokens, "n": sampling.n, "seed": sample.seed,
                         "stop": list(sampling.stop)},
            "job_id": self.job_id, "worker_id": self.worker_id, "node_id": self.node_id,
            "source_file": row["_gf_source"], "source_row": row["_gf_row"],
            "started_at": started, "finished_at": finished,
        })
        return out

    def _error(self, row: dict, kind: str, message: str) -> dict:
        return error_row(row, kind, message, self.job_id, self.worker_id, self.node_id)


def error_row(row: dict, kind: str, message: str, job_id: str, worker_id: str, node_id: str) -> dict:
    data = {k: v for k, v in row.items() if k not in META_COLUMNS}
    return {
        "id": row["_gf_id"], "error_type": kind, "message": message,
        "input": row["_gf_raw"] or json.dumps(data, default=str, ensure_ascii=False),
        "source_file": row["_gf_source"], "source_row": row["_gf_row"], "job_id": job_id,
        "worker_id": worker_id, "node_id": node_id, "failed_at": now(),
    }


def commit(ledger: Ledger, rows: list[dict], results: list[dict], errors: list[dict], schema: pa.Schema) -> None:
    """One part per input file in this batch (part names carry the file's key), errors before results."""
    by_source: dict[str, list[dict]] = {}
    for row in rows:
        by_source.setdefault(row["_gf_source"], []).append(row)
    for source, source_rows in by_source.items():
        name = part_name(source_key(source), min(r["_gf_row"] for r in source_rows),
                         [r["_gf_id"] for r in source_rows])
        source_errors = [e for e in errors if e["source_file"] == source]
        source_results = [r for r in results if r["source_file"] == source]
        # A batch retried after its actor died may put a row on the other side this time (an error then, a result
        # now): the earlier side's part goes first, so a crash in between leaves the rows to generate again.
        if not source_errors:
            ledger.withdraw(name, errors=True)
        if not source_results:
            ledger.withdraw(name)
        if source_errors:
            ledger.commit(pa.Table.from_pylist(source_errors, schema=ERROR_SCHEMA), name, errors=True)
        if source_results:
            ledger.commit(pa.Table.from_pylist(source_results, schema=schema), name)


def stats_row(rows: int, results: list[dict], errors: list[dict], generated_tokens: int | None = None,
              reused: int = 0, prefill: tuple[int, int] = (0, 0)) -> pa.Table:
    """The counts the driver's progress display gets; `generated_tokens` counts every attempt (engine work)."""
    return pa.Table.from_pylist([{
        "rows": rows, "results": len(results), "errors": len(errors),
        "completion_tokens": sum(r["completion_tokens"] for r in results) if generated_tokens is None
        else generated_tokens,
        "flagged": sum(1 for r in results if r["quality"] and r["sample_index"] == 0),
        "reused": reused, "engine_prompt_tokens": prefill[0], "cached_prompt_tokens": prefill[1],
    }], schema=STATS_SCHEMA)


def record_failures(batch: pa.Table, job: JobSpec, job_id: str) -> pa.Table:
    """The last pass: rows no engine could finish, even alone, are written as engine_error rows."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    rows = batch.to_pylist()
    message = "the engine actor died on this row on every try (see workers.max_retries)"
    errors = [error_row(row, *(row["_gf_error"].split(": ", 1) if row["_gf_error"] else ("engine_error", message)),
                        job_id, "", node_id) for row in rows]
    output = job.output.path
    commit(Ledger(output, sinks=make_task(job.task).sinks(output)), rows, [], errors, ERROR_SCHEMA)
    return stats_row(len(rows), [], errors)
