"""Template task: the user's Jinja template over any columns, as chat messages or a raw prompt; optionally with a
structured output (a JSON schema whose top-level properties become typed columns, a list of choices, a regex)."""

from __future__ import annotations

from typing import Literal

import jinja2
import pyarrow as pa
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment
from pydantic import AliasChoices, Field, field_validator, model_validator

from genfarm.errors import UserError
from genfarm.rows import Prompt, RowError
from genfarm.spec import Spec, TaskConfig
from genfarm.structured import check_regex, load_schema, parse_choice, parse_json, parse_regex, schema_columns
from genfarm.task import RowSampling, Task

# Sandboxed: templates come from job files; StrictUndefined: a missing column is an error, not an empty string.
ENV = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


class Message(Spec):
    role: Literal["system", "user", "assistant"]
    content: str


class TemplateConfig(TaskConfig):
    type: Literal["template"]
    menu_order = 30
    messages: list[Message] | None = Field(None, description="Chat messages; each content is a Jinja template.")
    prompt: str | None = Field(None, description="A raw Jinja prompt sent without a chat template.")
    json_schema: dict | None = Field(
        None, validation_alias=AliasChoices("schema", "json_schema"), serialization_alias="schema",
        description="A JSON schema (inline, or the path of a .json/.yaml file) the answer must follow; its "
        "top-level properties become typed columns.")
    choices: list[str] | None = Field(None, min_length=2, description="The answer must be one of these.")
    regex: str | None = Field(None, description="The answer must match this regular expression.")

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema(cls, value):
        return None if value is None else load_schema(value)

    @field_validator("regex")
    @classmethod
    def _regex(cls, value):
        return None if value is None else check_regex(value)

    @model_validator(mode="after")
    def _one_of_messages_or_prompt(self) -> TemplateConfig:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of task.messages (chat) or task.prompt (raw text)")
        if sum(x is not None for x in (self.json_schema, self.choices, self.regex)) > 1:
            raise ValueError("give at most one of task.schema, task.choices and task.regex")
        return self

    def constraint(self) -> dict | None:
        """The structured output vLLM's guided decoding enforces, if any."""
        if self.json_schema is not None:  # compact JSON: no tokens spent (or looped on) between the values
            return {"json": self.json_schema, "disable_any_whitespace": True}
        if self.choices is not None:
            return {"choice": self.choices}
        return {"regex": self.regex} if self.regex is not None else None


class Template(Task):
    Config = TemplateConfig

    def __init__(self, config: TemplateConfig):
        super().__init__(config)
        sources = [m.content for m in config.messages] if config.messages else [config.prompt]
        self.templates = [compile_template(src, field) for src, field in zip(sources, self._fields())]
        self.variables = sorted(set().union(*(meta.find_undeclared_variables(ENV.parse(s)) for s in sources)))

    def _fields(self) -> list[str]:
        if self.config.messages:
            return [f"task.messages[{i}].content" for i in range(len(self.config.messages))]
        return ["task.prompt"]

    def required_columns(self) -> list[str]:
        return self.variables

    def prompt(self, row: dict) -> Prompt:
        rendered = [render(t, row) for t in self.templates]
        if not any(r.strip() for r in rendered):
            raise RowError("empty_prompt", "the template rendered to empty text")
        if self.config.prompt is not None:
            return Prompt(text=rendered[0])
        return Prompt(messages=[{"role": m.role, "content": r} for m, r in zip(self.config.messages, rendered)])

    def sampling(self, row: dict) -> RowSampling | None:
        constraint = self.config.constraint()
        return RowSampling(structured=constraint) if constraint else None

    def output_schema(self) -> dict[str, pa.DataType]:
        return schema_columns(self.config.json_schema) if self.config.json_schema else {}

    def parse(self, row: dict, text: str) -> dict:
        if self.config.json_schema is not None:
            return parse_json(text, self.config.json_schema)
        if self.config.choices is not None:
            parse_choice(text, self.config.choices)
        elif self.config.regex is not None:
            parse_regex(text, self.config.regex)
        return {}


def compile_template(source: str, field: str) -> jinja2.Template:
    try:
        return ENV.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise UserError(field, f"invalid Jinja template (line {err.lineno}: {err.message})",
                        "fix the template syntax, e.g. {{ column_name }}") from None


def render(template: jinja2.Template, row: dict) -> str:
    try:
        return template.render(**row)
    except jinja2.UndefinedError as err:
        raise RowError("missing_field", f"template needs {err.message}") from None
    except Exception as err:  # noqa: BLE001 - any other failure is this row's, reported with its type
        raise RowError("invalid_template", f"{type(err).__name__}: {err}") from None
