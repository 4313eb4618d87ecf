"""Typed job specs loaded from YAML, with `--set key.sub=value` overrides.

Every model forbids unknown fields, so a typo in a job file is an error that names the field instead of a
setting that silently does nothing.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from genfarm.errors import UserError
from genfarm.translation.languages import UnknownLanguage, to_code


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(Spec):
    path: str = Field(description="File, folder, glob or URI (s3://, gs://, ...) of Parquet, JSONL or CSV rows.")
    format: Literal["auto", "parquet", "jsonl", "csv", "text"] = Field(
        "auto", description="auto goes by file extension; text: each file is one document (Markdown or plain text)."
    )
    id_column: str | None = Field(None, description="Column holding a unique row id; default: FILE:ROW_NUMBER.")
    limit: int | None = Field(None, ge=1, description="Only the first N rows of each file (for trying a job out).")


class TaskBase(Spec):
    columns: dict[str, str] = Field(
        default_factory=dict, description="Task field -> dataset column, e.g. {topic: subject}."
    )
    system_prompt: str | None = None


class ArticleTask(TaskBase):
    type: Literal["article"]
    audience: str = "a general audience"
    length: str = "about 300 words"
    style: str = "clear and informative"
    language: str = "English"


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


class TranslateTask(TaskBase):
    type: Literal["translate"]
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
    def _consistent_languages(self) -> TranslateTask:
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


def _language_code(code: str) -> str:
    try:
        return to_code(code)
    except UnknownLanguage as err:
        raise ValueError(f"{err}. Fix: use a BCP 47 code such as de, fr, es or pt-BR") from None


class Message(Spec):
    role: Literal["system", "user", "assistant"]
    content: str


class TemplateTask(Spec):
    type: Literal["template"]
    messages: list[Message] | None = Field(None, description="Chat messages; each content is a Jinja template.")
    prompt: str | None = Field(None, description="A raw Jinja prompt sent without a chat template.")

    @model_validator(mode="after")
    def _one_of_messages_or_prompt(self) -> TemplateTask:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of task.messages (chat) or task.prompt (raw text)")
        return self


TaskSpec = Annotated[Union[ArticleTask, TranslateTask, TemplateTask], Field(discriminator="type")]
TASK_TYPES = {"article": ArticleTask, "translate": TranslateTask, "template": TemplateTask}


class ModelSpec(Spec):
    name: str = Field("smollm2-135m-instruct", description="Registry name, local model folder, or hub id.")
    revision: str | None = Field(None, description="Hub revision (commit, tag or branch) for hub models.")


class EngineSpec(Spec):
    device: Literal["auto", "cpu", "gpu"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int = Field(2048, ge=16)
    max_num_seqs: int = Field(64, ge=1)
    kv_cache_gib: float = Field(1.0, gt=0, description="KV-cache size per engine, in GiB.")
    tensor_parallel_size: int = Field(1, ge=1)
    gpus_per_worker: float | None = Field(None, ge=0, description="Default: tensor_parallel_size on GPUs.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs each engine actor reserves in Ray.")
    cpu_threads: int | None = Field(None, ge=1, description="Threads of a CPU engine; default: every core of its "
                                    "machine (Ray would otherwise give it one thread per reserved CPU).")
    enforce_eager: bool = True
    request_timeout_s: float | None = Field(
        600, gt=0, description="A request still generating after this many seconds becomes a timeout error row."
    )
    long_prompts: Literal["error", "truncate"] = Field(
        "error", description="A prompt too long for max_model_len becomes an error row, or is cut from the left."
    )


class SamplingSpec(Spec):
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)
    n: int = Field(1, ge=1, description="Samples per prompt.")
    seed: int | None = Field(0, description="Base seed; each row's seed derives from it and the row id.")
    stop: list[str] = Field(default_factory=list)


class ScaleRange(Spec):
    """A fixed count, or a min/max range to autoscale within (engine actors of a job, replicas of a service)."""

    section: ClassVar[str] = "scale"  # the name errors use
    count: int | None = Field(None, ge=1, description="Fixed number (default 1).")
    min: int | None = Field(None, ge=1, description="With max: an autoscaling range.")
    max: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _count_or_range(self) -> ScaleRange:
        section = type(self).section
        if self.count is not None and (self.min is not None or self.max is not None):
            raise ValueError(f"give {section}.count or {section}.min/max, not both")
        if (self.min is None) != (self.max is None):
            raise ValueError(f"{section}.min and {section}.max go together")
        if self.min is not None and self.min > self.max:
            raise ValueError(f"{section}.min ({self.min}) is larger than {section}.max ({self.max})")
        return self

    @property
    def bounds(self) -> tuple[int, int]:
        if self.min is not None:
            return self.min, self.max
        return self.count or 1, self.count or 1


class WorkersSpec(ScaleRange):
    section: ClassVar[str] = "workers"
    batch_size: int = Field(64, ge=1, description="Rows handed to an engine at once.")
    max_retries: int = Field(2, ge=0, description="Tries again for a batch whose engine actor died.")
    batches_in_flight: int = Field(
        3, ge=1, description="Batches an engine works on at once, so it never idles while one batch finishes."
    )


class OutputSpec(Spec):
    path: str = Field(description="Output folder (local path or URI); results are OUTPUT/*.parquet.")


class JobSpec(Spec):
    name: str | None = None
    input: InputSpec
    task: TaskSpec
    model: ModelSpec = ModelSpec()
    engine: EngineSpec = EngineSpec()
    sampling: SamplingSpec = SamplingSpec()
    workers: WorkersSpec = WorkersSpec()
    output: OutputSpec


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value), the value read as YAML so numbers and lists keep their type."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text}", "expected KEY=VALUE", "write it like --set sampling.max_tokens=256")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = node[key] = {}
            node = child
        node[keys[-1]] = value
    return data


def load_job(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Read and validate a job file; every problem is a one-line UserError naming the field."""
    return load_spec(JobSpec, path, overrides, "job file", example="jobs/articles.yaml")


def load_spec(model: type[Spec], path: str | Path, overrides: list[str], what: str, example: str) -> Any:
    """Read a YAML file into `model`, with --set overrides applied first."""
    path = Path(path)
    if not path.is_file():
        raise UserError(str(path), f"{what} not found", f"check the path, e.g. {example}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(where, f"not valid YAML ({getattr(err, 'problem', err)})", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise UserError(str(path), f"a {what} is a YAML mapping", f"see {example} for the layout")
    return validate(model, apply_overrides(data, list(overrides)), source=str(path))


def validate(model: type[BaseModel], data: Any, source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise describe_validation_error(model, err, source) from None


def describe_validation_error(model: type[BaseModel], err: ValidationError, source: str) -> UserError:
    """Turn pydantic's first complaint into a one-line error with the dotted field name and a fix."""
    first = err.errors(include_url=False)[0]
    raw_loc = [str(part) for part in first["loc"]]
    # Discriminated unions put the tag in the path (task.article.length): keep it for hints, drop it from names.
    loc = [p for i, p in enumerate(raw_loc) if not (i == 1 and raw_loc[0] == "task" and p in TASK_TYPES)]
    field = ".".join(loc) or "(top level)"
    kind, message = first["type"], first["msg"]
    where = f"{source}: {field}"
    if kind == "extra_forbidden":
        known = _field_names(model, raw_loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"remove it; valid fields here: {', '.join(known)}"
        return UserError(where, "unknown field", fix)
    if kind == "missing":
        return UserError(where, "required field is missing", f"add {field} to the job file or pass --set {field}=...")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return UserError(where, f"unknown task type {first.get('input', {}).get('type')!r}" if kind ==
                         "union_tag_invalid" else "task.type is missing",
                         f"use one of: {', '.join(TASK_TYPES)}")
    if kind == "value_error":  # a validator's message may carry its own fix after ". Fix: "
        problem, _, fix = message.removeprefix("Value error, ").partition(". Fix: ")
        return UserError(where if loc else source, problem, fix or "see the README's job-file table")
    got = first.get("input")
    return UserError(where, f"{message} (got {got!r})", f"set {field} to a valid value")


def _field_names(model: type[BaseModel], loc: list[str]) -> list[str]:
    """The fields valid at a dotted location, for 'did you mean' hints."""
    current: Any = model
    for part in loc:
        if current is TaskSpec:
            current = TASK_TYPES.get(part)
            continue
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return []
        current = TaskSpec if part == "task" and current is JobSpec else fields[part].annotation
    return sorted(getattr(current, "model_fields", {}))
