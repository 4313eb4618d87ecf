"""Translate task: a `text` column + source/target language (per row or for the whole job) -> a translation.

With documents (task.target_languages, or task.segment.enabled), each input row is a document: the task's expander
turns it into one work row per segment and target language (genfarm/translation/splitter.py), each segment's prompt
adds the glossary terms it uses, the previous segment for context, and a rule to keep placeholders, and the finish
hook reassembles the documents into OUTPUT/_documents.
"""

from __future__ import annotations

import json
import uuid
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, Field, field_validator, model_validator

from genfarm.quality import Hints
from genfarm.rows import Prompt, RowError, text_field
from genfarm.serve.patterns import any_case_of, branches, stripped
from genfarm.serve.protocol import SamplingParams, Usage
from genfarm.spec import JobSpec, Spec
from genfarm.task import FinishedJob, MappedTaskConfig, Online, Route, Task
from genfarm.translation import languages
from genfarm.translation.documents import assemble_documents, document_counts
from genfarm.translation.flow import BudgetTooSmall, translate_text
from genfarm.translation.prompts import segment_prompt, sentence_prompt
from genfarm.translation.splitter import PAYLOAD, DocumentSplitter, document_splitter


class SegmentSpec(Spec):
    enabled: bool | Literal["auto"] = Field(
        "auto", description="Split documents into segments and reassemble them; auto: when target_languages is set."
    )
    max_tokens: int | Literal["auto"] = Field(
        "auto", description="Source tokens per segment (model tokenizer); auto: what fits beside prompt and answer."
    )

    @field_validator("max_tokens")
    @classmethod
    def _at_least_eight(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 8:
            raise ValueError(f"{value} tokens per segment is too few. Fix: use at least 8, or auto")
        return value


class TranslateConfig(MappedTaskConfig):
    type: Literal["translate"]
    menu_order = 20
    source_language: str | None = Field(None, description="Job-wide source language; or a source_language column.")
    target_language: str | None = Field(None, description="Job-wide target language; or a target_language column.")
    target_languages: list[str] | None = Field(
        None, description="BCP 47 codes (de, fr, pt-BR); every document is translated into each of them."
    )
    segment: SegmentSpec = SegmentSpec()
    context: bool = Field(False, description="Show the model the previous segment of the document, for context.")
    glossary: dict[str, str | dict[str, str]] = Field(
        default_factory=dict, description="Fixed terms: term -> translation, or term -> {language code: translation}."
    )

    @field_validator("target_languages")
    @classmethod
    def _bcp47_codes(cls, codes: list[str] | None) -> list[str] | None:
        if codes is None:
            return None
        if not codes:
            raise ValueError("the list is empty. Fix: name at least one target language, e.g. [de, fr]")
        normalized = [_language_code(code) for code in codes]
        if len(set(normalized)) < len(normalized):
            raise ValueError(f"{codes} names a language twice. Fix: list each target language once")
        return normalized

    @model_validator(mode="after")
    def _consistent_languages(self) -> TranslateConfig:
        if self.target_languages is not None and self.target_language is not None:
            raise ValueError("give task.target_language or task.target_languages, not both. Fix: use "
                             "target_languages: [de, fr] for several")
        if self.documents and self.source_language is not None:
            object.__setattr__(self, "source_language", _language_code(self.source_language))
        for term, translations in self.glossary.items():
            if isinstance(translations, dict):
                codes = {_language_code(code): text for code, text in translations.items()}
                unused = set(codes) - set(self.target_languages or codes)
                if unused:
                    raise ValueError(f"glossary term {term!r} has translations into {', '.join(sorted(unused))}, "
                                     "which is not a target language. Fix: add it to task.target_languages")
                self.glossary[term] = codes
        return self

    @property
    def documents(self) -> bool:
        """Whether rows are documents to segment, translate per segment and reassemble."""
        return self.segment.enabled is True or (self.segment.enabled == "auto" and self.target_languages is not None)

    @property
    def segment_max_tokens(self) -> int | str:
        return self.segment.max_tokens


def _language_code(code: str) -> str:
    try:
        return languages.to_code(code)
    except languages.UnknownLanguage as err:
        raise ValueError(f"{err}. Fix: use a BCP 47 code such as de, fr, es or pt-BR") from None


class TranslationRequest(SamplingParams):
    text: str = Field(min_length=1, description="Plain text or Markdown; long texts are translated in segments, "
                      "code blocks, inline code and URLs are kept as they are.")
    source_language: str | None = Field(None, description="BCP 47 code or English name (fr, pt-BR, French); "
                                        "default: the serve config's tasks.translate, else not named to the model.")
    target_language: str | None = Field(None, description="BCP 47 code or English name.")
    model: str | None = None


class TranslationResponse(BaseModel):
    id: str
    object: Literal["translation"] = "translation"
    model: str
    source_language: str | None
    target_language: str
    text: str
    segments: int = Field(description="Pieces sent to the model (long texts are split to fit it; code is not sent).")
    finish_reason: str | None
    usage: Usage


# /openapi.json's pattern for a language field: what languages.to_code takes (a tag of a known language, its script
# and region, or an English name), in any case, between spaces
LANGUAGE = stripped(any_case_of(languages.LANGUAGES) + "(?:[-_][A-Za-z]{4})?(?:[-_](?:[A-Za-z]{2}|[0-9]{3}))?",
                    any_case_of(languages.BY_NAME))
SENTENCE_COLUMNS = {"source_language": pa.string(), "target_language": pa.string()}
SEGMENT_COLUMNS = {"document_id": pa.string(), "segment_index": pa.int32(), "segment_count": pa.int32()}


class Translate(Task):
    Config = TranslateConfig
    route = Route("/v1/translations", TranslationRequest, TranslationResponse,
                  "Translate a text (the batch `translate` task)")
    output_columns = SENTENCE_COLUMNS
    quality_defaults = {"language": True, "length_ratio": (0.3, 3.0)}
    config: TranslateConfig

    @classmethod
    def describe_request(cls, schema: dict, config: TranslateConfig) -> None:
        """Languages genfarm knows; the target is required unless the serve config's tasks.translate names one."""
        props = schema["properties"]
        for name in ("source_language", "target_language"):
            for branch in branches(props[name], "string"):
                branch["pattern"] = LANGUAGE
        if config.target_language is None:
            schema.setdefault("required", []).append("target_language")
            props["target_language"] = {"type": "string", "pattern": LANGUAGE,
                                        "description": props["target_language"].get("description", "")}

    def output_schema(self) -> dict[str, pa.DataType]:
        return {**SENTENCE_COLUMNS, **(SEGMENT_COLUMNS if self.config.documents else {})}

    def required_columns(self) -> list[str]:
        needed = [self.config.columns.get("text", "text")]
        for name in ("source_language", "target_language"):
            if getattr(self.config, name) is None and not (name == "target_language" and self.config.target_languages):
                needed.append(self.config.columns.get(name, name))
        return needed

    def languages(self, row: dict) -> tuple[str, str]:
        """A sentence row's languages, as the job or the row writes them."""
        c = self.config
        source, [target] = languages.resolve(row, c.columns, c.source_language, c.target_language, codes=False)
        return source, target

    def prompt(self, row: dict) -> Prompt:
        text = text_field(row, "text", self.config.columns)
        segment = _segment(row)
        if segment is not None:
            return segment_prompt(self.config, text, segment["source_language"], segment["target_language"],
                                  segment["context"])
        return sentence_prompt(self.config, text, *self.languages(row))

    def parse(self, row: dict, text: str) -> dict:
        segment = _segment(row)
        if segment is not None:
            return {"source_language": segment["source_language"], "target_language": segment["target_language"],
                    "document_id": segment["document_id"], "segment_index": segment["index"],
                    "segment_count": segment["count"]}
        source, target = self.languages(row)
        return {"source_language": source, "target_language": target}

    def hints(self, row: dict) -> Hints:
        """The translation should be in the target language and about as long as its source."""
        segment = _segment(row)
        try:
            target = segment["target_language"] if segment else languages.to_code(self.languages(row)[1])
        except (RowError, languages.UnknownLanguage):
            target = None  # a language the checks cannot name is not checked
        return Hints(language=target, source=row.get(self.config.columns.get("text", "text")))

    # --- documents: one row per segment, reassembled at the end -----------------------------------------------
    def expander(self, job: JobSpec, model_path: str) -> DocumentSplitter | None:
        if not self.config.documents:
            return None
        return document_splitter(self.config, job.engine, job.sampling, model_path)

    def finish(self, done: FinishedJob) -> None:
        if done.expander is not None:
            assemble_documents(done.output, done.fs, done.files, done.input, done.expander, done.job_id)

    def summary(self, ledger) -> dict:
        documents = document_counts(ledger)
        return {"documents": documents} if documents else {}

    # --- online: a whole text, segmented like a document ------------------------------------------------------
    async def respond(self, row: dict, online: Online) -> TranslationResponse:
        text_field(row, "text", {})  # the same checks as a batch row
        c = self.config
        try:
            source, [target] = languages.resolve(row, {}, c.source_language or "", c.target_language)
        except languages.LanguageError as err:
            raise online.reject(str(err), param=err.field) from None
        except RowError as err:
            raise online.reject(f"{err.message.replace('column ', '')}: give it in the request or set "
                                "tasks.translate.target_language in the serve config", param="target_language",
                                code=err.kind) from None
        prompts: list[list[int]] = []

        async def generate(batch: list[Prompt]) -> list[tuple[str, str | None]]:
            prompts.extend(online.encode(prompt, param="text") for prompt in batch)
            answers = await online.complete(prompts)
            return [(completions[0].text, completions[0].finish_reason) for completions in answers]

        settings = c.model_copy(update={"source_language": source or None, "target_languages": [target]})
        try:
            done = await translate_text(settings, row["text"], source or None, target, online.tokenizer,
                                        online.engine, online.sampling, generate)
        except BudgetTooSmall as err:
            raise online.reject(str(err), param="max_tokens") from None
        return TranslationResponse(id=f"translation-{uuid.uuid4().hex}", model=online.model,
                                   source_language=source or None, target_language=target, text=done.text,
                                   segments=done.segments, finish_reason=done.finish_reason,
                                   usage=online.usage(prompts))


def _segment(row: dict) -> dict | None:
    """A segment row's place in its document (None for a sentence row)."""
    payload = row.get(PAYLOAD)
    return json.loads(payload) if payload else None
