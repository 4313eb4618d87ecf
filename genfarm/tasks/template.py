"""Template task: the user's Jinja template over any columns, as chat messages or a raw prompt."""

from __future__ import annotations

from typing import Literal

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment
from pydantic import Field, model_validator

from genfarm.errors import UserError
from genfarm.rows import Prompt, RowError
from genfarm.spec import Spec, TaskConfig
from genfarm.task import Task

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

    @model_validator(mode="after")
    def _one_of_messages_or_prompt(self) -> TemplateConfig:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of task.messages (chat) or task.prompt (raw text)")
        return self


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
