"""Running a batch job: check everything the user can get wrong, then stream read -> generate -> commit on Ray.

The driver only plans (file list, schema, counts from footers) and draws progress; rows flow from read tasks to
engine actors, which commit their own parts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow.compute as pc

from genfarm import models
from genfarm.batch import compact
from genfarm.batch.datasource import PromptSource
from genfarm.batch.ledger import FIRST_SAMPLE, MANIFEST, SUMMARY, Ledger
from genfarm.batch.order import PromptOrder
from genfarm.batch.progress import JobProgress, LiveTokens
from genfarm.batch.source import META_COLUMNS, count_work_rows, input_error, input_schema, list_inputs
from genfarm.batch.worker import OWN_COLUMNS, GenerateWorker, record_failures
from genfarm.engine import use_gpu, worker_resources
from genfarm.errors import UserError
from genfarm.local_ray import use_local_ray_env
from genfarm.spec import JobSpec, QualitySpec, validate
from genfarm.storage import storage_error
from genfarm.task import Expander, FinishedJob, Task, make_task


def fingerprint_parts(job: JobSpec, model: models.ResolvedModel) -> dict:
    """Everything that changes what a row's output would be; a resumed job must match it."""
    return {
        "task": job.task.model_dump(mode="json"),
        "model": {"name": model.name, "revision": model.revision},
        "sampling": job.sampling.model_dump(mode="json"),
        "engine": {"max_model_len": job.engine.max_model_len, "long_prompts": job.engine.long_prompts},
        "input": {"id_column": job.input.id_column},
        # Quality settings change which texts are kept; left at their defaults they add nothing (earlier folders
        # resume as they were).
        **({"quality": job.quality.model_dump(mode="json")} if job.quality != QualitySpec() else {}),
    }


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def check_resume(store: Ledger, parts: dict, restart: bool) -> dict:
    """Load or create the job manifest; refuse to mix outputs of different settings in one folder."""
    compact.finish(store)  # a merge of parts that a crash interrupted
    manifest = store.read_json(MANIFEST)
    if manifest and restart:
        kept = store.move_aside(_stamp())
        manifest = None
        if kept:
            logging.getLogger("genfarm").warning("earlier results kept in %s", kept)
    if manifest and manifest["fingerprint"] != fingerprint(parts):
        changed = [f"{k}.{sub}" for k in parts for sub in parts[k]
                   if manifest["settings"].get(k, {}).get(sub) != parts[k][sub]]
        raise UserError("output.path", f"{store.uri} holds a job run with other settings (changed: "
                        f"{', '.join(changed)})", "re-run with --restart (earlier results are kept under "
                        "_genfarm/previous-*) or choose a new output.path")
    return manifest or {}


def start_ray(job: JobSpec) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray explains its defaults at every start; a genfarm user sees genfarm's progress instead.
    for name in ("ray._private.authentication.authentication_token_setup", "ray.data._internal.progress"):
        logging.getLogger(name).setLevel(logging.ERROR)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        return
    # A local cluster needs a logical CPU for every engine actor plus one for reading, whatever the cores.
    _, most = job.workers.bounds
    cpus = max(os.cpu_count() or 1, int(most * job.engine.cpus_per_worker) + 1)
    use_local_ray_env()
    # address="local": a fresh instance, never a `ray start` cluster that happens to run on this machine.
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)


@dataclass
class Plan:
    """What the driver works out before any row moves: small, whatever the dataset's size."""

    job: JobSpec
    fs: object
    files: list
    schema: object
    model: models.ResolvedModel
    store: Ledger
    job_id: str
    run_id: str
    total: int
    task: Task
    expander: Expander | None = None  # turns input rows into several work rows (the task's), else None
    live_tokens: object = None  # the LiveTokens actor engine actors report to, once Ray runs
    engine: object = None  # the engine actors use instead of vLLM: only benchmarks.pipeline's echo engine


def plan_job(job: JobSpec, restart: bool, job_file: str) -> Plan:
    """Every check a user can fail, before Ray starts: task, input, columns, model, output folder."""
    task = make_task(job.task)  # compiles templates: syntax errors surface before anything starts
    clash = sorted(set(task.output_schema()) & OWN_COLUMNS)
    if clash:
        raise UserError("task", f"the task's output columns {', '.join(clash)} are genfarm's own",
                        "rename them (e.g. the schema's properties)")
    fs, files = list_inputs(job.input)
    try:
        schema = input_schema(fs, files)
    except OSError as err:  # a file that vanished or may not be read since it was listed
        raise input_error(job.input, err) from None
    reserved = [name for name in schema.names if name in META_COLUMNS]
    if reserved:
        raise UserError("input.path", f"the input has columns named like genfarm's own ({', '.join(reserved)})",
                        "rename them in the input")
    for column in task.required_columns() + ([job.input.id_column] if job.input.id_column else []):
        if column not in schema.names:
            raise UserError(f"task.columns ({column})", f"the input has no column {column!r} (columns: "
                            f"{', '.join(schema.names)})", "map it with task.columns: {field: column} or fix input")
    model = models.resolve(job.model.name, job.model.revision)
    expander = task.expander(job, model.path)  # before the output folder is touched: its errors are the user's
    try:
        total = count_work_rows(fs, files, job.input, expander)  # reads every file: one that cannot be read is refused
    except OSError as err:
        raise input_error(job.input, err) from None
    store = Ledger(job.output.path)
    parts = fingerprint_parts(job, model)
    run_id = uuid.uuid4().hex
    try:  # the folder is read (an earlier run's manifest), then written
        manifest = check_resume(store, parts, restart)
        job_id = manifest.get("job_id") or f"{job.name or 'job'}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
        store.write_json(MANIFEST, {
            "job_id": job_id, "fingerprint": fingerprint(parts), "settings": parts, "job_file": job_file,
            "spec": job.model_dump(mode="json"), "created_at": manifest.get("created_at") or _now(),
        })
        store.start_run(run_id, _now())
    except OSError as err:  # a folder that cannot be made or written (permissions, a read-only or virtual fs)
        if not store.local:  # a missing bucket, missing or refused credentials
            raise storage_error("output.path", job.output.path, err, "write to") from None
        raise UserError("output.path", f"cannot write to {store.uri} ({err.strerror or err})",
                        "choose a folder you can write to, e.g. --set output.path=out/my-job") from None
    return Plan(job, fs, files, schema, model, store, job_id, run_id, total, task, expander)


def run_job(job: JobSpec, restart: bool = False, show_progress: bool = True, job_file: str = "",
            engine: object = None) -> dict:
    """Run (or resume) a job to the end and return its summary. `engine` stands in for vLLM in every engine actor
    (benchmarks.pipeline measures genfarm's own pipeline with an echo engine, named as such)."""
    plan = plan_job(job, restart, job_file)
    plan.engine = engine
    start_ray(job)
    _quiet_ray_data()
    started = time.monotonic()
    plan.live_tokens = live_token_counter()
    with JobProgress(plan.total, plan.store.count().rows, enabled=show_progress) as progress:
        stop_following = progress.follow(plan.live_tokens)
        generate_pass(plan, progress, job.workers.batch_size, job.workers.max_retries, job.workers.batches_in_flight)
        if missing(plan):
            # Some batches failed even after retries (an engine that keeps dying): retry their rows one by one, one
            # at a time per engine, so only the rows that really kill the engine end up as errors (a row in flight
            # beside one that kills the engine would die with it, untried).
            generate_pass(plan, progress, batch_size=1, retries=0, in_flight=1)
        if missing(plan):
            record_pass(plan, progress)
        stop_following.set()
    plan.task.finish(FinishedJob(job.output.path, plan.fs, plan.files, job.input, plan.expander, plan.job_id))
    summary = summarize(plan, time.monotonic() - started, progress, merge_parts(plan))
    plan.store.write_json(SUMMARY, summary)
    return summary


def merge_parts(plan: Plan) -> compact.Compacted | None:
    """Merge the job's parts (output.compact). A task that writes each part in another format too (OpenAI batch
    files) keeps its parts as they are. The rows are committed whatever happens here, so a store that fails now
    costs the merge, not the job: the next run on the folder merges them."""
    if not plan.job.output.compact or plan.task.sinks(plan.job.output.path):
        return None
    try:
        return compact.compact(plan.store)
    except OSError as err:
        logging.getLogger("genfarm").warning("parts of %s not merged (%s); the results are complete",
                                             plan.store.uri, err)
        return None


def live_token_counter():
    import ray

    return ray.remote(num_cpus=0)(LiveTokens).remote()


def retry_errors(output: str, types: list[str] | None, show_progress: bool = True) -> dict:
    """Generate the error rows of a job again (all, or those of some types), with the job's own settings."""
    store = Ledger(output)
    manifest = store.manifest()
    compact.finish(store)
    job = validate(JobSpec, manifest["spec"], f"{store.uri}/{MANIFEST}")  # a plugin no longer importable, say
    list_inputs(job.input)  # the input must still be there before any error row is taken back
    taken = store.take_errors(types, _stamp())
    if not taken:
        which = f" of type {', '.join(types)}" if types else ""
        raise UserError("--type" if types else "OUTPUT", f"no error rows{which}"
                        f" in {output}", "see them with: genfarm inspect OUTPUT --errors")
    return run_job(job, show_progress=show_progress, job_file=manifest.get("job_file", ""))


def missing(plan: Plan) -> bool:
    return plan.store.count().rows < plan.total


def source(plan: Plan, order: PromptOrder | None = None):
    """The rows not yet committed. Ray Data splits a read task's output into small pieces in order and bundles
    them into batches for whichever engine actor is free, so a batch holds neighbouring rows, and a run of rows
    (ordered by prompt, with `order`) ends up in one or two batches."""
    import ray

    return ray.data.read_datasource(PromptSource(plan.fs, plan.files, plan.schema, plan.job.input,
                                                 plan.job.output.path, expander=plan.expander, order=order))


def generate_pass(plan: Plan, progress: JobProgress, batch_size: int, retries: int, in_flight: int) -> None:
    """Stream every row not yet committed through the engine actors; a batch whose actor dies is retried on a
    restarted actor at most `retries` times, then left for the next pass instead of failing the job."""
    import ray

    job = plan.job
    gpus = ray.cluster_resources().get("GPU", 0)
    gpu = use_gpu(job.engine, gpus)
    if gpu and gpus == 0:
        raise UserError("engine.device", "gpu requested but the cluster has no GPUs", "set engine.device: cpu")
    least, most = job.workers.bounds
    with warnings.catch_warnings():
        # Ray deprecates passing max_restarts/max_task_retries here but offers no other way to bound retries yet.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        window = job.workers.prefix_window
        dataset = source(plan, PromptOrder(job.task, window) if window else None).map_batches(
            GenerateWorker,
            fn_constructor_kwargs={"job": job, "model": plan.model, "gpu": gpu, "input_schema": plan.schema,
                                   "job_id": plan.job_id, "run_id": plan.run_id, "live_tokens": plan.live_tokens,
                                   "engine": plan.engine},
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(
                min_size=least, max_size=most, max_tasks_in_flight_per_actor=in_flight,
                max_concurrent_calls_per_actor=in_flight, enable_true_multi_threading=True,
            ),
            max_restarts=-1,
            max_task_retries=retries,
            scheduling_strategy="SPREAD",  # one engine per node before any node gets a second
            **worker_resources(job.engine, gpus),
        )
    consume(dataset, progress)


def record_pass(plan: Plan, progress: JobProgress) -> None:
    """Rows that failed every try become engine_error rows, so the job ends with every row accounted for."""
    dataset = source(plan).map_batches(record_failures, fn_kwargs={"job": plan.job, "job_id": plan.job_id},
                                       batch_format="pyarrow", batch_size=256)
    consume(dataset, progress)


def consume(dataset, progress: JobProgress) -> None:
    for stats in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        progress.update(*(sum(stats[name].to_pylist())
                          for name in ("rows", "completion_tokens", "errors", "flagged", "reused",
                                       "engine_prompt_tokens", "cached_prompt_tokens")))


def summarize(plan: Plan, seconds: float, run: JobProgress, merged: compact.Compacted | None = None) -> dict:
    """Counts over every committed part (this run and earlier ones), timing of this run, and the task's own."""
    store = plan.store
    counts = store.count()
    return {
        "job_id": plan.job_id,
        "status": "complete" if counts.rows >= plan.total else "incomplete",
        "input_rows": plan.total,
        "completed_rows": counts.completed,
        "error_rows": counts.errors,
        "samples": store.count_rows(),
        "errors_by_type": store.value_counts("error_type", errors=True),
        "prompt_tokens": store.column_sum("prompt_tokens", where=FIRST_SAMPLE),  # each sample row repeats it
        "completion_tokens": store.column_sum("completion_tokens"),
        "run_seconds": round(seconds, 2),
        "run_completion_tokens": run.tokens,
        "run_tokens_per_second": round(run.tokens / seconds, 1) if seconds else 0.0,
        "run_reused_answers": run.reused,  # greedy prompts answered again without generating (identical prompts)
        # prompt tokens the engines took in this run, and the share their prefix caches held (workers.prefix_window)
        "run_prefix_cache": {"prompt_tokens": run.prompt_tokens, "cached_tokens": run.cached_tokens,
                             "hit_rate": round(run.cached_tokens / run.prompt_tokens, 3) if run.prompt_tokens else 0.0},
        "output": store.uri,
        # parts in the folder before and after this run merged them (output.compact), or null if it did not
        "compacted_parts": {"before": merged.parts_before, "after": merged.parts_after} if merged else None,
        "quality": quality_counts(store),
        **plan.task.summary(store),
        "finished_at": _now(),
    }


def quality_counts(store: Ledger) -> dict:
    """Rows by quality: flagged (a check still failed on one of its samples), regenerated, each check's failures
    (per sample), the fixes."""
    flagged = store.read(["id"], where=pc.list_value_length(pc.field("quality")) > 0)
    return {
        "flagged_rows": pc.count_distinct(flagged["id"]).as_py() if flagged is not None else 0,
        "regenerated_rows": store.count_rows((pc.field("attempts") > 1) & FIRST_SAMPLE),
        "failed_checks": store.value_counts("quality"),
        "fixes": store.value_counts("quality_fixes"),
    }


def _quiet_ray_data() -> None:
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.max_errored_blocks = -1  # a batch that failed every retry is retried row by row, not fatal
    # An engine actor takes `batches_in_flight` batches at once, so the pool is never more than 100% busy: Ray
    # Data's default threshold (175%) would never add an engine within workers.min/max, even on a node that joins.
    context.autoscaling_config.actor_pool_util_upscaling_threshold = 1.0
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

