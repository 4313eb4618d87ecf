"""The task protocol: what the batch pipeline and the online service may ask of a kind of content.

A task is one module in genfarm/tasks/ (or a plugin module) holding a config model (a `TaskConfig` subclass: the
job file's `task:` section) and a `Task` subclass that names it as `Config`. Defining the subclass registers it, so
job files, their error messages, the serve config and the HTTP routes all know the task; nothing else changes.

    row ──expand?──► work rows ──prompt/sampling──► engine ──parse──► output columns ──► ledger
                                                                         finish? (after the last pass)

Only `required_columns` and `prompt` are required; every other method has a default that does nothing.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import pyarrow as pa
from pydantic import BaseModel, Field

from genfarm.quality import Hints
from genfarm.rows import Prompt
from genfarm.spec import EngineSpec, InputSpec, JobSpec, SamplingSpec, TaskConfig, discover_tasks

TASKS: dict[str, type[Task]] = {}


class MappedTaskConfig(TaskConfig):
    """A task that reads named fields from the dataset (mappable to other columns) and has a system message."""

    columns: dict[str, str] = Field(
        default_factory=dict, description="Task field -> dataset column, e.g. {topic: subject}."
    )
    system_prompt: str | None = None


@dataclass(frozen=True)
class RowSampling:
    """What a task asks of the engine for one row, beyond the job's sampling section (None: the job's)."""

    max_tokens: int | None = None
    stop: tuple[str, ...] | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    seed: int | None = None  # the row's own seed (else one derived from the job's seed and the row id)
    structured: dict | None = None  # vLLM structured outputs: {"json": schema} | {"choice": [...]} | {"regex": ...}
    logprobs: bool = False  # ask for the text's log-probability (Completion.logprob), e.g. for a confidence

    def engine_extra(self) -> dict:
        """The parameters beyond the job's SamplingSpec, as genfarm.engine's to_sampling_params takes them."""
        return {"structured": self.structured, "logprobs": 0 if self.logprobs else None}


class Expander(Protocol):
    """Turns one input row into the work rows the engine sees (a document into its segments). Built on the driver,
    pickled to the read tasks; each work row keeps the input row's meta columns, gets its own `_gf_id`, and may carry
    the task's own data in `_gf_task` (a JSON string)."""

    def expand(self, row: dict) -> list[dict]: ...


@dataclass(frozen=True)
class FinishedJob:
    """What a task's `finish` hook gets once every row is accounted for."""

    output: str  # the job's output folder (a Ledger opens it)
    fs: Any  # the input's filesystem
    files: list  # the input files (genfarm.batch.source.InputFile)
    input: InputSpec
    expander: Expander | None
    job_id: str


@dataclass(frozen=True)
class Route:
    """The task's HTTP endpoint: POST `path` with a `request` body answers a `response`."""

    path: str
    request: type[BaseModel]
    response: type[BaseModel]
    summary: str = ""


class Online(Protocol):
    """What the online service lends a task answering one request (genfarm/serve/server.py: TaskCall)."""

    model: str  # the served model's name
    tokenizer: Any
    engine: EngineSpec
    sampling: SamplingSpec  # the request's sampling, the serve config's defaults filled in

    def encode(self, prompt: Prompt, param: str | None = None) -> list[int]: ...

    def complete(self, prompts: list[list[int]], wanted: RowSampling | None = None) -> Awaitable[list[list]]:
        """The whole completions (genfarm.engine.Completion) of each prompt, with the task's per-row sampling."""
        ...

    def reject(self, message: str, param: str | None = None, code: str = "invalid_parameter") -> Exception: ...

    def usage(self, prompts: list[list[int]]) -> dict: ...


class Task(ABC):
    Config: ClassVar[type[TaskConfig]]
    route: ClassVar[Route | None] = None
    output_columns: ClassVar[dict[str, pa.DataType]] = {}  # columns `parse` adds beside output_text
    quality_defaults: ClassVar[dict] = {}  # the task's quality checks and thresholds (genfarm/quality.py)
    trimmable: ClassVar[bool] = False  # a text cut at max_tokens may be trimmed back to its last sentence

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.Config.task_type() if "Config" in cls.__dict__ else None
        if name is not None:
            TASKS[name] = cls

    def __init__(self, config: TaskConfig):
        self.config = config

    # --- every row ---------------------------------------------------------------------------------------------
    @abstractmethod
    def required_columns(self) -> list[str]:
        """Input columns the task reads; a dataset without one is refused before the job starts."""

    @abstractmethod
    def prompt(self, row: dict) -> Prompt:
        """The prompt of one (work) row; raises genfarm.rows.RowError for a row that cannot be generated."""

    def sampling(self, row: dict) -> RowSampling | None:
        """Per-row changes to the job's sampling (a constraint, stop strings, a token budget); None: none."""
        return None

    def output_schema(self) -> dict[str, pa.DataType]:
        """The columns `parse` fills, with their Arrow types: `output_columns` unless the config adds some."""
        return dict(self.output_columns)

    def parse(self, row: dict, text: str) -> dict:
        """Output columns from a generated text (see `output_schema`); may raise RowError for text that is no
        answer."""
        return {}

    def parse_completion(self, row: dict, completion) -> dict:
        """`parse` with the whole completion (genfarm.engine.Completion: its log-probability, finish reason)."""
        return self.parse(row, completion.text)

    def hints(self, row: dict) -> Hints:
        """What the quality checks should know about a row: the language its text should be in, its source."""
        return Hints()

    # --- batch hooks -------------------------------------------------------------------------------------------
    def expander(self, job: JobSpec, model_path: str) -> Expander | None:
        """An Expander when one input row makes several work rows; checked on the driver before the job starts."""
        return None

    def sinks(self, output: str) -> list:
        """Sinks (genfarm.batch.sink.Sink) that write each committed part in another format too, before the
        ledger's Parquet record (e.g. OpenAI's batch output file)."""
        return []

    def finish(self, done: FinishedJob) -> None:
        """A pass over the committed results once every row is accounted for (segments -> documents)."""

    def summary(self, ledger) -> dict:
        """Extra entries for the job summary, read from the ledger (genfarm.batch.ledger.Ledger)."""
        return {}

    # --- online ------------------------------------------------------------------------------------------------
    @classmethod
    def describe_request(cls, schema: dict, config: TaskConfig) -> None:
        """Make the route's published request schema (/openapi.json) as exact as the config allows, in place (e.g.
        a field the config leaves no default for is required); by default it stays as the request model says."""

    async def respond(self, row: dict, online: Online) -> BaseModel:
        """The answer to one request on the task's route, whose task fields (the body without sampling parameters)
        are `row`: by default one prompt, one text, and its parsed columns."""
        ids = online.encode(self.prompt(row))
        [[completion]] = await online.complete([ids], self.sampling(row))
        fields = {**row, **self.parse_completion(row, completion), "text": completion.text,
                  "finish_reason": completion.finish_reason}
        response = self.route.response
        return response(id=f"{self.Config.task_type()}-{uuid.uuid4().hex}", model=online.model,
                        usage=online.usage([ids]), **{k: v for k, v in fields.items() if k in response.model_fields})


def task_classes() -> dict[str, type[Task]]:
    """Every registered task (built-in, installed plugins, and plugin modules imported so far)."""
    discover_tasks()
    return dict(TASKS)


def make_task(config: TaskConfig) -> Task:
    """The runtime of a task config. Its module is imported (the config's class comes from it), so it is
    registered, in any process that holds the config."""
    return TASKS[config.type](config)
