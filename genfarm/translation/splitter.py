"""Document rows -> segment rows for the batch pipeline, and the token budget a segment may use.

A document row becomes one row per translatable segment and target language, with the id DOC/LANG/SEGNO (SEGNO is
the segment's position in the document) and the segment's place in the task's `_gf_task` column. Segment rows then
flow like any other row: the exactly-once ledger, error rows, retries and resume all work on them unchanged.
Segmentation is deterministic (same text, tokenizer and budget: same segments), so reassembly segments a document
again instead of storing its layout.
"""

from __future__ import annotations

import json
from typing import Protocol

from genfarm.errors import UserError
from genfarm.rows import RowError, text_field
from genfarm.spec import EngineSpec, SamplingSpec
from genfarm.translation import languages
from genfarm.translation.prompts import PromptSettings, segment_prompt
from genfarm.translation.segment import Segment, segment_document

MIN_BUDGET = 16
# Translations often need more tokens than their source (German, or a tokenizer that favours English): a segment
# gets at most max_tokens / ANSWER_GROWTH source tokens, so its answer fits in sampling.max_tokens.
ANSWER_GROWTH = 1.5
MARGIN = 8  # tokens of slack for the chat template's joins, which do not add up exactly
PAYLOAD = "_gf_task"  # the pipeline's column for a task's own per-row data


class DocumentSettings(PromptSettings, Protocol):
    """The translate task's settings documents use (genfarm.tasks.translate.TranslateConfig has them)."""

    columns: dict[str, str]
    source_language: str | None
    target_language: str | None
    target_languages: list[str] | None
    context: bool
    segment_max_tokens: int | str


def segment_id(document_id: str, target: str, index: int) -> str:
    return f"{document_id}/{target}/{index}"


class DocumentSplitter:
    """Segments documents and expands document rows; picklable, so read tasks on any node can use it."""

    def __init__(self, settings: DocumentSettings, tokenizer_path: str, budget: int):
        self.settings, self.tokenizer_path, self.budget = settings, tokenizer_path, budget
        self._tokenizer = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}  # each process loads its own tokenizer

    def count_tokens(self, text: str) -> int:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    def segments(self, text: str) -> list[Segment]:
        return segment_document(text, self.count_tokens, self.budget)

    def text(self, row: dict) -> str:
        return text_field(row, "text", self.settings.columns)

    def languages(self, row: dict) -> tuple[str, list[str]]:
        """(source code, target codes) of a document row; a missing or unknown language is the row's error."""
        s = self.settings
        try:
            return languages.resolve(row, s.columns, s.source_language, s.target_language, s.target_languages)
        except languages.LanguageError as err:
            raise RowError("bad_type", f"column {s.columns.get(err.field, err.field)!r}: {err}") from None

    def expand(self, row: dict) -> list[dict]:
        """The segment rows of one document row (meta columns included); a row that cannot be a document, or
        already failed to parse, is passed on as it is, with its error."""
        if row["_gf_error"]:
            return [row]
        try:
            text = self.text(row)
            source, targets = self.languages(row)
        except RowError as err:
            return [{**row, "_gf_error": f"{err.kind}: {err.message}"}]
        segments = self.segments(text)
        translatable = [s for s in segments if s.translate]
        text_column = self.settings.columns.get("text", "text")
        rows = []
        for target in targets:
            previous = None
            for segment in translatable:
                context = previous.text if self.settings.context and previous is not None else None
                rows.append({**row, text_column: segment.text,
                             "_gf_id": segment_id(row["_gf_id"], target, segment.index),
                             PAYLOAD: json.dumps({"document_id": row["_gf_id"], "index": segment.index,
                                                  "count": len(segments), "source_language": source,
                                                  "target_language": target, "context": context})})
                previous = segment
        return rows


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def segment_budget(settings: DocumentSettings, engine: EngineSpec, sampling: SamplingSpec, tokenizer) -> int:
    """Source tokens per segment: the task's segment.max_tokens, or what fits beside the prompt, the previous
    segment (with context) and the answer."""
    if settings.segment_max_tokens != "auto":
        return settings.segment_max_tokens
    # The engine refuses prompts longer than this (genfarm.engine's PromptEncoder.encode keeps room for the answer).
    room = engine.max_model_len - min(sampling.max_tokens, engine.max_model_len // 2)
    longest = max(settings.target_languages or ["en"], key=lambda code: len(languages.name(code)))
    every_term = {term: t if isinstance(t, str) else max(t.values(), key=len) for term, t in settings.glossary.items()}
    empty = segment_prompt(settings, "⟦1⟧", settings.source_language or "en", longest,
                           "" if settings.context else None, terms=every_term)
    rendered = tokenizer.apply_chat_template(empty.messages, tokenize=False, add_generation_prompt=True)
    overhead = len(tokenizer.encode(rendered, add_special_tokens=False)) + MARGIN
    available = (room - overhead) // (2 if settings.context else 1)
    budget = min(available, int(sampling.max_tokens / ANSWER_GROWTH))
    if budget < MIN_BUDGET:
        raise UserError("task.segment.max_tokens", f"auto leaves {budget} source tokens per segment (context "
                        f"{engine.max_model_len}, answers up to {sampling.max_tokens} tokens, prompt {overhead})",
                        "raise engine.max_model_len or sampling.max_tokens, or shorten the glossary")
    return budget


def document_splitter(settings: DocumentSettings, engine: EngineSpec, sampling: SamplingSpec,
                      tokenizer_path: str) -> DocumentSplitter:
    tokenizer = load_tokenizer(tokenizer_path)
    return DocumentSplitter(settings, tokenizer_path, segment_budget(settings, engine, sampling, tokenizer))
