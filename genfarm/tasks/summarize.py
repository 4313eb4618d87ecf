"""Summarize task: a `text` column -> a summary of a target length (`task.length`: N sentences, N words or N bullet
points), optionally with a focus and in a language.

A text that fits the model (with its prompt and answer) is one row and one summary, like any task. A longer one is
cut by the translation segmenter (genfarm.translation.segment, Markdown-aware) into parts within a token budget:
the task's expander makes one work row per part (id DOC/PARTNO, the part's place as JSON in `_gf_task`), each part
is summarized with its share of the length target (by its share of the text's tokens, at least one sentence or
bullet, or 15 words), and the finish hook writes one summary per document to OUTPUT/_summaries/KEY.parquet.

That last step is deterministic, not a second generation: the parts' summaries are joined in document order
(paragraphs; lines for bullets). The finish hook has no engine, so a true map-reduce (the model rewriting the joined
summaries into one) is not done, and a document in more parts than the target has sentences gets one sentence per
part, so its summary can be longer than asked. The online route joins the same way, so both agree. Code blocks and
tables go to the model only when they fit a part; a larger one is left out of the summary's source.
"""

from __future__ import annotations

import itertools
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, field_validator

from genfarm.batch.ledger import Ledger
from genfarm.batch.source import InputFile, source_rows
from genfarm.errors import UserError
from genfarm.quality import Hints
from genfarm.rows import Prompt, RowError, chat, text_field
from genfarm.serve.protocol import SamplingParams, Usage
from genfarm.spec import EngineSpec, InputSpec, JobSpec, SamplingSpec, Spec
from genfarm.storage import atomic_path
from genfarm.task import FinishedJob, MappedTaskConfig, Online, Route, Task
from genfarm.tasks.reply import language_code, wanted_language
from genfarm.translation.documents import LedgerWindow
from genfarm.translation.splitter import PAYLOAD, DocumentSplitter, load_tokenizer

SYSTEM = ("You are an expert editor. You write accurate, concise summaries that keep the key facts, names and "
          "numbers, and add nothing that is not in the text.")
LENGTH = re.compile(r"^(?:about|around|roughly|up to|at most|~)?\s*(\d+)\s*"
                    r"(words?|sentences?|bullets?|bullet points?)$", re.IGNORECASE)
MIN_BUDGET = 32  # text tokens per part, at the least
MIN_PART_WORDS = 15  # a part's share of a target in words, at the least
MARGIN = 16  # tokens of slack: chat-template joins, a row's own language name
NEAR_BUDGET = 32  # a part this close to the budget is counted whole (joined pieces count a little differently)
SUMMARIES = "_summaries"  # one summary per document; "_": pandas.read_parquet(OUTPUT) reads result rows only
ROWS_PER_GROUP = 64

SUMMARY_SCHEMA = pa.schema([
    ("document_id", pa.string()), ("source_file", pa.string()), ("text", pa.string()),
    ("status", pa.string()),  # complete | partial (parts failed, listed; text: the other parts') | failed (none)
    ("segments", pa.int32()),  # parts summarized (1: the document fit the model whole)
    ("failed_segments", pa.list_(pa.int32())), ("errors", pa.list_(pa.string())),
    ("truncated_segments", pa.list_(pa.int32())),  # parts whose summary was cut at sampling.max_tokens
    ("words", pa.int32()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
    ("job_id", pa.string()), ("assembled_at", pa.timestamp("ms", tz="UTC")),
])


@dataclass(frozen=True)
class Length:
    """A summary's length target."""

    count: int
    unit: Literal["words", "sentences", "bullets"]

    @classmethod
    def parse(cls, text: str) -> Length:
        match = LENGTH.match(text.strip())
        if not match or int(match[1]) < 1:
            raise ValueError(f"{text!r} is not a length. Fix: write it like 3 sentences, 120 words or 5 bullet "
                             "points")
        unit = match[2].lower()
        return cls(int(match[1]), "words" if unit.startswith("word") else
                   "sentences" if unit.startswith("sentence") else "bullets")

    def describe(self, count: int | None = None) -> str:
        n = self.count if count is None else count
        if self.unit == "words":
            return f"about {n} words"
        plural = "s" if n != 1 else ""
        return f"{n} sentence{plural}" if self.unit == "sentences" else \
            f"{n} bullet point{plural}, one per line starting with '- '"

    @property
    def max_words(self) -> int:
        """The most words a summary may have before the quality check flags it."""
        return max(2 * self.count, self.count + 20) if self.unit == "words" else \
            self.count * (40 if self.unit == "sentences" else 30)

    def shares(self, sizes: list[int]) -> list[int]:
        """Each part's share of the target, by its share of the tokens (largest remainders, so the shares add up to
        the target), but at least one sentence or bullet, or 15 words."""
        least = MIN_PART_WORDS if self.unit == "words" else 1
        exact = [self.count * size / (sum(sizes) or 1) for size in sizes]
        shares = [int(x) for x in exact]
        for i in sorted(range(len(sizes)), key=lambda i: shares[i] - exact[i])[:self.count - sum(shares)]:
            shares[i] += 1
        return [max(least, share) for share in shares]

    def combine(self, summaries: list[str]) -> str:
        """The parts' summaries as one, in document order: paragraphs, or the lines of one list."""
        return ("\n" if self.unit == "bullets" else "\n\n").join(s.strip() for s in summaries if s.strip())


def check_length(value: str | None) -> str | None:
    if value is not None:
        Length.parse(value)
    return value


class SummarySegments(Spec):
    enabled: bool = Field(True, description="Summarize a text too long for the model in parts; false: such a text is "
                          "a prompt_too_long error row.")
    max_tokens: Annotated[int, Field(ge=MIN_BUDGET)] | Literal["auto"] = Field(
        "auto", description="Text tokens per part (model tokenizer); auto: what fits beside the prompt and answer.")


class SummarizeConfig(MappedTaskConfig):
    type: Literal["summarize"]
    menu_order = 40
    length: str = Field("3 sentences", description="The summary's length: N sentences, N words or N bullet points.")
    focus: str | None = Field(None, description="What the summary should be about, e.g. 'decisions and deadlines'.")
    language: str | None = Field(None, description="Language of the summaries (code or English name); a row's "
                                 "`language` column wins; default: the text's own (not checked).")
    segment: SummarySegments = SummarySegments()

    _length = field_validator("length")(check_length)
    _language = field_validator("language")(language_code)

    @property
    def target(self) -> Length:
        return Length.parse(self.length)


class SummaryRequest(SamplingParams):
    text: str = Field(min_length=1, description="Plain text or Markdown; a long text is summarized in parts.")
    length: str | None = Field(None, description="N sentences, N words or N bullet points; default: the serve "
                               "config's tasks.summarize.length.")
    focus: str | None = None
    language: str | None = None
    model: str | None = None

    _length = field_validator("length")(check_length)


class SummaryResponse(BaseModel):
    id: str
    object: Literal["summary"] = "summary"
    model: str
    text: str
    segments: int = Field(description="Parts summarized (a text too long for the model is summarized in parts, "
                          "whose summaries are joined in order).")
    finish_reason: str | None
    usage: Usage


def summary_prompt(config: SummarizeConfig, text: str, language: str | None, part: dict | None) -> Prompt:
    """The prompt of a whole text (`part` None) or of one part of a long one."""
    if part is None:
        ask = f"Summarize the text below in {config.target.describe()}."
    else:
        ask = (f"The text below is part {part['index'] + 1} of {part['count']} of a longer document. Summarize this "
               f"part in {config.target.describe(part['target'])}.")
    if config.focus:
        ask += f" Focus on {config.focus}."
    ask += f" Write the summary in {language}." if language else " Write the summary in the language of the text."
    return chat(config.system_prompt or SYSTEM, f"{ask} Write only the summary.\n\nText:\n{text}")


def part_budget(config: SummarizeConfig, engine: EngineSpec, sampling: SamplingSpec, tokenizer) -> int:
    """Text tokens per part: task.segment.max_tokens, or what fits beside a part's prompt and its answer."""
    room = engine.max_model_len - min(sampling.max_tokens, engine.max_model_len // 2)  # as the engine counts it
    language = wanted_language({}, {}, config.language)[0]
    empty = summary_prompt(config, "", language, {"index": 998, "count": 999, "target": 999})
    rendered = tokenizer.apply_chat_template(empty.messages, tokenize=False, add_generation_prompt=True)
    available = room - len(tokenizer.encode(rendered, add_special_tokens=False)) - MARGIN
    fit = f"fit beside the prompt and an answer of {sampling.max_tokens} tokens (context {engine.max_model_len})"
    if available < MIN_BUDGET:
        raise UserError("sampling.max_tokens", f"only {available} text tokens per part {fit}, fewer than "
                        f"{MIN_BUDGET}", "lower sampling.max_tokens or raise engine.max_model_len")
    if config.segment.max_tokens != "auto" and config.segment.max_tokens > available:
        raise UserError("task.segment.max_tokens", f"{config.segment.max_tokens} text tokens per part do not fit: "
                        f"{available} {fit}", f"lower it to {available} or auto, or raise engine.max_model_len")
    return available if config.segment.max_tokens == "auto" else config.segment.max_tokens


class SummarySplitter(DocumentSplitter):
    """Document rows -> part rows within the token budget (a document that fits stays one row); picklable."""

    settings: SummarizeConfig

    def __init__(self, settings: SummarizeConfig, tokenizer_path: str | None, budget: int, tokenizer=None):
        super().__init__(settings, tokenizer_path, budget)
        self._tokenizer = tokenizer  # already loaded (the driver's, the served model's); pickling drops it

    def parts(self, text: str) -> list[tuple[str, int]]:
        """(text, tokens) of each part: the segmenter's segments packed in order up to the budget (a segment alone
        may pass it by its list or heading marker, which MARGIN leaves room for); a verbatim block (code, a table)
        larger than the budget is left out."""
        parts: list[tuple[str, int]] = []
        current, used = "", 0
        for segment in self.segments(text):
            body = (segment.prefix + segment.source.replace("\n", "\n" + segment.line_prefix) + segment.suffix
                    if segment.translate else segment.text)
            if not body.strip():
                continue
            tokens = self.count_tokens(body)
            if not segment.translate and tokens > self.budget:
                continue
            used += tokens
            if current and used > self.budget - NEAR_BUDGET:  # counts do not quite add up: near the end, count
                used = self.count_tokens((current + body).strip())
                if used > self.budget:
                    parts.append((current.strip(), self.count_tokens(current.strip())))
                    current, used = "", tokens
            current += body + segment.after
        if current.strip():
            parts.append((current.strip(), used))
        return parts

    def expand(self, row: dict) -> list[dict]:
        """The part rows of a document longer than the budget; any other row (an error, a text that fits) as is."""
        try:
            text = self.text(row) if not row["_gf_error"] else None
        except RowError:
            text = None  # the row's prompt raises the same error: it becomes an error row like any other
        if text is None or self.count_tokens(text) <= self.budget:
            return [row]
        parts = self.parts(text)
        if not parts:
            return [row]
        column = self.settings.columns.get("text", "text")
        targets = self.settings.target.shares([tokens for _, tokens in parts])
        return [{**row, column: part, "_gf_id": f"{row['_gf_id']}/{index}",
                 PAYLOAD: json.dumps({"document_id": row["_gf_id"], "index": index, "count": len(parts),
                                      "target": target})}
                for index, ((part, _), target) in enumerate(zip(parts, targets))]


class Summarize(Task):
    Config = SummarizeConfig
    route = Route("/v1/summaries", SummaryRequest, SummaryResponse,
                  "Summarize a text (the batch `summarize` task); a long one in parts")
    output_columns = {"document_id": pa.string(), "segment_index": pa.int32(), "segment_count": pa.int32()}
    quality_defaults = {"length_ratio": (0.0, 1.0)}  # a summary is no longer than its text
    trimmable = True
    config: SummarizeConfig

    def __init__(self, config: SummarizeConfig):
        super().__init__(config)
        self.quality_defaults = {**Summarize.quality_defaults, "max_words": config.target.max_words}

    def required_columns(self) -> list[str]:
        return [self.config.columns.get("text", "text")]

    def prompt(self, row: dict) -> Prompt:
        text = text_field(row, "text", self.config.columns)
        language, _ = wanted_language(row, self.config.columns, self.config.language)
        return summary_prompt(self.config, text, language, _part(row))

    def parse(self, row: dict, text: str) -> dict:
        part = _part(row)
        if part is None:
            return {"document_id": row.get("_gf_id"), "segment_index": 0, "segment_count": 1}
        return {"document_id": part["document_id"], "segment_index": part["index"], "segment_count": part["count"]}

    def hints(self, row: dict) -> Hints:
        """The summary should be shorter than its text, and in the language asked for (if one is)."""
        try:
            language = wanted_language(row, self.config.columns, self.config.language)[1]
        except RowError:
            language = None
        return Hints(language=language, source=row.get(self.config.columns.get("text", "text")))

    # --- long documents: parts, then one summary per document ---------------------------------------------------
    def expander(self, job: JobSpec, model_path: str) -> SummarySplitter | None:
        if not self.config.segment.enabled:
            return None
        tokenizer = load_tokenizer(model_path)
        budget = part_budget(self.config, job.engine, job.sampling, tokenizer)
        return SummarySplitter(self.config, model_path, budget, tokenizer)

    def finish(self, done: FinishedJob) -> None:
        if done.expander is None:
            return
        import ray

        task = ray.remote(num_cpus=1, max_retries=2)(summarize_file)
        ray.get([task.remote(done.output, done.fs, file, done.input, done.expander, done.job_id)
                 for file in done.files])

    def summary(self, ledger) -> dict:
        if ledger.fs.get_file_info(ledger.path(SUMMARIES)).type != pafs.FileType.Directory:
            return {}
        counts = {"complete": 0, "partial": 0, "failed": 0, **ledger.value_counts("status", folder=SUMMARIES)}
        return {"documents": {"documents": sum(counts.values()), **counts, "output": ledger.path(SUMMARIES)}}

    # --- online: the same parts and the same join ---------------------------------------------------------------
    async def respond(self, row: dict, online: Online) -> SummaryResponse:
        text_field(row, "text", {})  # the same checks as a batch row
        settings = self.config.model_copy(update={"columns": {}, **{k: row[k] for k in ("length", "focus")
                                                                   if k in row}})
        try:
            budget = part_budget(settings, online.engine, online.sampling, online.tokenizer)
        except UserError:  # no room for parts: the text goes whole, and the engine refuses it if it does not fit
            budget = None
        task, row = Summarize(settings), {**row, "_gf_id": "request", "_gf_error": None, PAYLOAD: None}
        rows = [row] if budget is None else SummarySplitter(settings, None, budget, online.tokenizer).expand(row)
        prompts = [online.encode(task.prompt(part), param="text") for part in rows]
        answers = [completions[0] for completions in await online.complete(prompts)]
        cut = any(answer.finish_reason == "length" for answer in answers)
        return SummaryResponse(id=f"summary-{uuid.uuid4().hex}", model=online.model,
                               text=settings.target.combine([answer.text for answer in answers]), segments=len(rows),
                               finish_reason="length" if cut else answers[-1].finish_reason,
                               usage=online.usage(prompts))


def _part(row: dict) -> dict | None:
    """A part row's place in its document (None for a whole text)."""
    payload = row.get(PAYLOAD)
    return json.loads(payload) if payload else None


def summarize_file(output: str, fs, file: InputFile, spec: InputSpec, splitter: SummarySplitter,
                   job_id: str) -> None:
    """Write OUTPUT/_summaries/KEY.parquet for one input file, atomically, a row group at a time."""
    store = Ledger(output)
    window = LedgerWindow(store, file.key)
    rows = (document_summary(row, splitter, window, job_id) for row in source_rows(fs, file, spec))
    with (atomic_path(store.fs, store.path(SUMMARIES, f"{file.key}.parquet"), store.tmp_dir) as target,
          pq.ParquetWriter(target, SUMMARY_SCHEMA, filesystem=store.fs) as writer):
        while group := list(itertools.islice(rows, ROWS_PER_GROUP)):
            writer.write_table(pa.Table.from_pylist(group, schema=SUMMARY_SCHEMA))


def document_summary(row: dict, splitter: SummarySplitter, window: LedgerWindow, job_id: str) -> dict:
    """One document's summary from the committed results of its work rows (the same rows the expander made)."""
    results, errors = window.rows(row["_gf_row"])
    summaries, failed, messages, truncated, prompt_tokens, completion_tokens = [], [], [], [], 0, 0
    work = splitter.expand(row)
    for index, part in enumerate(work):
        record = results.get(part["_gf_id"])
        if record is None:
            failed.append(index)
            error = errors.get(part["_gf_id"])
            reason = f"{error['error_type']}: {error['message']}" if error else "not generated (run the job again)"
            messages.append(f"segment {index}: {reason}" if len(work) > 1 else reason)
            continue
        summaries.append(record["output_text"])
        prompt_tokens += record["prompt_tokens"]
        completion_tokens += record["completion_tokens"]
        if record["finish_reason"] == "length":
            truncated.append(index)
    text = splitter.settings.target.combine(summaries) if summaries else None
    return {"document_id": row["_gf_id"], "source_file": row["_gf_source"], "text": text,
            "status": "complete" if not failed else "partial" if summaries else "failed", "segments": len(work),
            "failed_segments": failed, "errors": messages, "truncated_segments": truncated,
            "words": len(text.split()) if text else 0, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "job_id": job_id, "assembled_at": datetime.now(UTC)}
