"""genfarm's command line: parse, call, print. User mistakes end in one line on stderr and exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Column, Table

from genfarm.console import ADDRESS_HELP, err, log_path, out, system_output_to
from genfarm.errors import UserError
from genfarm.serve.batches_cli import batches_app
from genfarm.serve.cli import serve_app

app = typer.Typer(
    help="Generate content at scale with vLLM on Ray: batch jobs from job files, models, and results.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="List and prepare models (the default model is embedded; no model hub needed).",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")
jobs_app = typer.Typer(help="Follow jobs submitted to a cluster: list, status, logs, stop.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
cluster_app = typer.Typer(help="See a running Ray cluster: nodes, engines, Serve replicas, jobs.",
                          no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
app.add_typer(serve_app, name="serve")
app.add_typer(batches_app, name="batches")

SET_HELP = "Override a job-file field, e.g. --set sampling.max_tokens=256 --set output.path=out/x (repeatable)."


@app.command()
def run(
    job_file: Path = typer.Argument(..., help="Job file (YAML), e.g. jobs/articles.yaml."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    restart: bool = typer.Option(False, "--restart", help="Start over; earlier results are moved to "
                                 "OUTPUT/_genfarm/previous-* instead of deleted."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the live progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run a batch job to the end, or resume it: rows already committed in the output folder are skipped."""
    from genfarm.batch.job import run_job
    from genfarm.spec import load_job

    job = load_job(job_file, set_)
    log = log_path("run")
    try:
        with system_output_to(log):
            summary = run_job(job, restart=restart, show_progress=progress, job_file=str(job_file))
    except KeyboardInterrupt:
        err.print("[yellow]stopped[/]: every committed part is kept; run the same command again to finish.")
        raise typer.Exit(130)
    finish(summary, as_json, log)


@app.command("retry-errors")
def retry_errors(
    output: str = typer.Argument(..., help="A job's output folder."),
    types: list[str] = typer.Option([], "--type", help="Only error rows of this type (repeatable), e.g. timeout."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the live progress bar."),
) -> None:
    """Generate a job's error rows again with the job's own settings (the old error rows are kept aside)."""
    from genfarm.batch.job import retry_errors as retry
    from genfarm.rows import ERROR_TYPES

    for kind in types:
        if kind not in ERROR_TYPES:
            raise UserError(f"--type {kind}", "unknown error type", f"use one of: {', '.join(ERROR_TYPES)}")
    log = log_path("retry-errors")
    with system_output_to(log):
        summary = retry(output, types or None, show_progress=progress)
    finish(summary, False, log)


def finish(summary: dict, as_json: bool, log: Path) -> None:
    """Print a job summary (and where Ray's own messages went); exit 1 when rows are still missing."""
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
        if log.is_file() and log.stat().st_size:
            err.print(f"[dim]Ray's own messages: {log}[/]", highlight=False)
    if summary["status"] != "complete":
        raise typer.Exit(1)


def print_summary(summary: dict) -> None:
    errors = ", ".join(f"{k}: {v}" for k, v in summary["errors_by_type"].items()) or "none"
    out.print(
        f"[bold]{summary['job_id']}[/] {summary['status']}: {summary['completed_rows']:,} of "
        f"{summary['input_rows']:,} rows generated, {summary['error_rows']:,} errors ({errors})\n"
        f"this run: {summary['run_completion_tokens']:,} tokens in {summary['run_seconds']:.1f}s = "
        f"{summary['run_tokens_per_second']:,.0f} tok/s{prefix_cache_note(summary)}\n"
        f"results: {summary['output']}/*.parquet  (pandas.read_parquet('{summary['output']}'))",
        highlight=False,
    )
    quality = summary.get("quality")
    if quality and (quality["flagged_rows"] or quality["regenerated_rows"] or quality["fixes"]):
        checks = ", ".join(f"{k}: {v}" for k, v in quality["failed_checks"].items()) or "none"
        fixes = ", ".join(f"{k}: {v}" for k, v in quality["fixes"].items()) or "none"
        out.print(f"quality: {quality['flagged_rows']:,} rows flagged (failed checks: {checks}), "
                  f"{quality['regenerated_rows']:,} regenerated, fixes: {fixes}; "
                  f"see them with genfarm inspect {summary['output']} --quality", highlight=False)
    if "documents" in summary:
        print_documents(summary["documents"])


def prefix_cache_note(summary: dict) -> str:
    cache = summary.get("run_prefix_cache")
    if not cache or not cache["prompt_tokens"]:
        return ""
    return f"; the prefix cache held {cache['hit_rate']:.0%} of {cache['prompt_tokens']:,} prompt tokens"


def print_documents(counts: dict) -> None:
    """The documents line of a job that reassembles documents (translate, summarize): how many came back whole."""
    out.print(f"documents: {counts['documents']:,} ({counts['complete']:,} complete, {counts['partial']:,} partial, "
              f"{counts['failed']:,} failed) in {counts['output']}/*.parquet", highlight=False)


@app.command()
def status(output: str = typer.Argument(..., help="A job's output folder.")) -> None:
    """Show how far a job got: rows committed, errors, and whether it is complete."""
    from genfarm.batch import compact
    from genfarm.batch.ledger import MANIFEST, SUMMARY, Ledger
    from genfarm.spec import JobSpec, validate
    from genfarm.task import make_task

    store = Ledger(output)
    manifest = store.manifest()
    compact.finish(store)  # a merge of parts that a crash interrupted would count rows twice
    summary = store.read_json(SUMMARY) or {}
    counts = store.count()
    total = summary.get("input_rows")
    out.print(f"[bold]{manifest['job_id']}[/] model {manifest['settings']['model']['name']}: "
              f"{counts.completed:,} rows generated, {counts.errors:,} errors"
              + (f", {counts.rows:,}/{total:,} done" if total else ""), highlight=False)
    if total is not None and counts.rows >= total:
        out.print("complete")
    else:
        out.print("incomplete: run the same `genfarm run` command again to finish")
    extra = make_task(validate(JobSpec, manifest["spec"], f"{store.uri}/{MANIFEST}").task).summary(store)
    if "documents" in extra:
        print_documents(extra["documents"])


@app.command()
def inspect(
    output: str = typer.Argument(..., help="A job's output folder."),
    rows: int = typer.Option(5, "--rows", "-n", min=1, help="How many rows to show."),
    errors: bool = typer.Option(False, "--errors", help="Show error rows instead of results."),
    quality: bool = typer.Option(False, "--quality", help="Show only results flagged by a quality check, with "
                                 "the checks they failed."),
) -> None:
    """Preview a job's results (or errors, or the rows a quality check flagged) as a table."""
    import pyarrow.compute as pc

    from genfarm.batch.ledger import ERRORS, Ledger

    flagged = pc.list_value_length(pc.field("quality")) > 0 if quality and not errors else None
    table = Ledger(output).read(errors=errors, limit=rows, where=flagged)
    if table is None:
        what = "error rows" if errors else "results"
        raise UserError("OUTPUT", f"no {what} in {output}", "run a job first, or check the folder")
    if table.num_rows == 0:
        out.print(f"{output}: every result passed its quality checks")
        return
    shown = ("id", "title", "target_language", "output_text", "finish_reason", "completion_tokens")
    if quality:
        shown = ("id", "quality", "quality_fixes", "attempts", "output_text", "finish_reason")
    columns = (["id", "error_type", "message"] if errors else [c for c in shown if c in table.column_names])
    what = "/" + ERRORS if errors else " (flagged by quality checks)" if quality else ""
    view = Table(title=f"{output}{what}: first {table.num_rows} rows", show_lines=True)
    for column in columns:
        view.add_column(column, overflow="fold", max_width=80 if column in ("output_text", "message") else None)
    for row in table.select(columns).to_pylist():
        view.add_row(*(_short(row[c]) for c in columns))
    out.print(view)


def _short(value, limit: int = 400) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + " …"


@app.command("eval")
def evaluate(
    output: str = typer.Argument(..., help="A translate or classify job's output folder."),
    references: Optional[str] = typer.Option(None, "--references", help="Translations: JSONL file (or folder of "
                                             'them) of references, {"id", "target_language", "reference"} per line, '
                                             "e.g. examples/references."),
    gold: Optional[str] = typer.Option(None, "--gold", help="Classifications: the input column with the true "
                                       "labels, e.g. label."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Score the references that have a "
                                       "translation and skip the others (default: every reference needs one)."),
    as_json: bool = typer.Option(False, "--json", help="Print the scores as JSON."),
) -> None:
    """Score a job: translations against references (chrF and BLEU, sacrebleu: per language and per document), or
    classifications against a column of true labels (accuracy, macro-F1, per-label precision/recall/F1)."""
    if (references is None) == (gold is None):
        raise UserError("genfarm eval", "give --references (translations) or --gold (classifications), one of them",
                        "e.g. genfarm eval out/classify --gold label")
    if gold is not None:
        return print_classification_scores(output, gold, as_json)
    from genfarm.translation import evaluate as scores

    corpus, documents = scores.evaluate(scores.load_translations(output), scores.load_references(references),
                                        allow_missing)
    if as_json:
        print(json.dumps(scores.as_json(corpus, documents), indent=2))
        return
    per_document = Table("id", "language", "status", "chrF", "BLEU", title="per document")
    for d in documents:
        per_document.add_row(d.id, d.target_language, d.status, f"{d.chrf:.2f}", f"{d.bleu:.2f}")
    out.print(per_document)
    per_language = Table("language", "documents", "chrF", "BLEU", title="corpus (sacrebleu)")
    for c in corpus:
        per_language.add_row(c.target_language, str(c.documents), f"{c.chrf:.2f}", f"{c.bleu:.2f}")
    out.print(per_language)
    for c in corpus:
        out.print(f"{c.target_language}: {c.chrf_signature}  {c.bleu_signature}", highlight=False)


def print_classification_scores(output: str, gold: str, as_json: bool) -> None:
    from genfarm.batch.ledger import Ledger
    from genfarm.tasks.classify import score

    scores = score(Ledger(output), gold)
    if as_json:
        print(json.dumps(scores, indent=2))
        return
    view = Table("label", "precision", "recall", "F1", "support", title=f"{output} against {scores['gold_column']}")
    for label, s in scores["per_label"].items():
        view.add_row(label, f"{s['precision']:.3f}", f"{s['recall']:.3f}", f"{s['f1']:.3f}", str(s["support"]))
    out.print(view)
    out.print(f"accuracy {scores['accuracy']:.4f}, macro-F1 {scores['macro_f1']:.4f} over {scores['scored_rows']} "
              f"rows ({scores['error_rows']} error rows not scored)", highlight=False)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What to ask the model."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help="Model name, folder or hub id."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Most tokens to generate."),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0, help="0 for greedy."),
    seed: Optional[int] = typer.Option(0, "--seed", help="Seed for sampling."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message."),
) -> None:
    """Answer one prompt with the engine in this process (no Ray): a quick check of a model. Only the answer is
    printed, on stdout; the engine's warnings are left out (set VLLM_LOGGING_LEVEL=WARNING to see vLLM's)."""
    import logging
    import os
    import warnings

    from genfarm import models

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    warnings.simplefilter("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)
    from genfarm.engine import ChatTemplateRefused, Engine, PromptTooLong
    from genfarm.spec import EngineSpec, SamplingSpec

    resolved = models.resolve(model)
    engine = Engine(resolved, EngineSpec(vllm={"use_tqdm_on_load": False}))  # no weight-loading bar on the screen
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    sampling = SamplingSpec(max_tokens=max_tokens, temperature=temperature, seed=seed)
    try:
        prompt_ids = engine.encode(engine.render(messages, None), max_tokens)
    except ChatTemplateRefused as err:
        raise UserError("--system", str(err), "leave out --system for this model") from None
    except PromptTooLong as err:
        raise UserError("PROMPT", str(err), "shorten the prompt or lower --max-tokens") from None
    result = engine.generate([prompt_ids], [sampling], [seed])[0]
    if isinstance(result, Exception):
        raise UserError("PROMPT", str(result), "shorten the prompt or choose another model")
    print(result.completions[0].text)


@models_app.command("list")
def models_list() -> None:
    """Show embedded models and whether they are prepared; any local folder or hub id works too."""
    from genfarm import models

    view = Table("name", "status", "path", "description")
    for row in models.listing():
        view.add_row(row["name"], row["status"], row["path"], row["description"])
    out.print(view)
    out.print("Also usable as model.name: a local Hugging Face model folder, or a hub id (org/model) if you have "
              "a hub.")


@models_app.command("prepare")
def models_prepare(name: str = typer.Argument("smollm2-135m-instruct", help="Embedded model to prepare.")) -> None:
    """Convert an embedded model into a vLLM-ready folder in the cache (once; GENFARM_CACHE moves the cache)."""
    from genfarm import models

    out.print(f"{name} ready at {models.prepare(name)}")


@app.command()
def submit(
    job_file: Path = typer.Argument(..., help="Job file (YAML)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
) -> None:
    """Submit a batch job to a running cluster through Ray's Jobs API; the job file and local input go along."""
    from genfarm import cluster

    job_id = cluster.submit(str(job_file), set_, cluster.address_or_default(address))
    out.print(f"submitted {job_id}\nfollow it: genfarm jobs status {job_id}   genfarm jobs logs {job_id}")


@jobs_app.command("list")
def jobs_list(address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)) -> None:
    """Jobs submitted to the cluster, newest last."""
    from genfarm import cluster

    # ids are copied into other commands: never folded
    view = Table(Column("job id", no_wrap=True), Column("status", no_wrap=True), "entrypoint", "message")
    for job in cluster.jobs(cluster.address_or_default(address)):
        view.add_row(job["job_id"], job["status"], job["entrypoint"], job["message"])
    out.print(view)


@jobs_app.command("status")
def jobs_status(job_id: str, address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)) -> None:
    """One job's status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    from genfarm import cluster

    out.print(cluster.job_status(cluster.address_or_default(address), job_id))


@jobs_app.command("logs")
def jobs_logs(job_id: str, address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)) -> None:
    """A job's driver output so far (genfarm's progress lines and summary)."""
    from genfarm import cluster

    print(cluster.job_logs(cluster.address_or_default(address), job_id), end="")


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)) -> None:
    """Stop a job; its committed parts stay, and submitting it again finishes it."""
    from genfarm import cluster

    stopped = cluster.stop_job(cluster.address_or_default(address), job_id)
    out.print("stopping" if stopped else "already finished")


@cluster_app.command("status")
def cluster_status(
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
) -> None:
    """Nodes with their CPUs, GPUs and memory, the engines and Serve replicas on each, and running jobs."""
    from genfarm import cluster

    status = cluster.cluster_status(cluster.address_or_default(address))
    if as_json:
        print(json.dumps(status, indent=2))
        return
    view = Table("node", "ip", "state", "head", "CPUs", "GPUs", "memory GiB", "engines", "serve replicas")
    for n in status["nodes"]:
        view.add_row(n["node_id"][:12], n["ip"], n["state"], "yes" if n["head"] else "", f"{n['cpus']:g}",
                     f"{n['gpus']:g}", f"{n['memory_gib']:g}", str(n["engines"]), str(n["serve_replicas"]))
    out.print(view)
    for job in status["jobs"]:
        out.print(f"job {job['job_id']}: {job['status']} - {job['entrypoint']}")


def main() -> None:
    try:
        app()
    except UserError as error:
        err.print(f"[red]error[/]: {escape(str(error))}", highlight=False)  # file names may hold [brackets]
        sys.exit(2)


if __name__ == "__main__":
    main()
