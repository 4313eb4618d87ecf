"""What a row can be on its way through genfarm: the prompt a task builds from it, the typed error that ends it,
and how a task reads its text fields. Shared by tasks, the batch pipeline and the online service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ERROR_TYPES = (
    "bad_json",  # a JSONL line that is not a JSON object
    "bad_row",  # a row the file cannot give: a CSV line with the wrong number of fields, a corrupt Parquet row group
    "missing_field",  # a column the task needs is absent or null
    "bad_type",  # a value of the wrong type (a number where text is needed)
    "duplicate_id",  # the id column repeats a value within a file
    "empty_prompt",  # the text the task needs is empty
    "invalid_template",  # the user's template failed on this row
    "chat_template",  # the model's chat template refuses the row's messages (e.g. a role it does not take)
    "prompt_too_long",  # longer than the engine's context allows
    "engine_error",  # vLLM refused or failed this prompt
    "timeout",  # generation took longer than the per-request limit
    "invalid_output",  # the generated text is not what the task asked for (no JSON, not a choice, fails the schema)
    "quality",  # the text failed the job's quality checks on every try (with quality.on_failure: error)
    "invalid_request",  # an API request row the online API would refuse (openai task: url, body, model)
)


class RowError(Exception):
    """A row that cannot be generated; it becomes an error record and the job goes on."""

    def __init__(self, kind: str, message: str):
        assert kind in ERROR_TYPES, kind
        self.kind, self.message = kind, message
        super().__init__(f"{kind}: {message}")

    @classmethod
    def parse(cls, text: str) -> RowError:
        """The error a `kind: message` string carries (as error columns and the pipeline's `_gf_error` hold it)."""
        kind, _, message = text.partition(": ")
        return cls(kind, message)


@dataclass(frozen=True)
class Prompt:
    """Chat messages (sent through the model's chat template) or a raw text prompt."""

    messages: list[dict] | None = None
    text: str | None = None


def text_field(row: dict[str, Any], name: str, columns: dict[str, str], default: str | None = None) -> str:
    """A non-empty text value for task field `name`, read from its mapped column, else the job-wide default."""
    column = columns.get(name, name)
    value = row.get(column)
    if value is None:
        if default is not None:
            return default
        raise RowError("missing_field", f"column {column!r} is missing or null")
    if not isinstance(value, str):
        raise RowError("bad_type", f"column {column!r} should be text, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise RowError("empty_prompt", f"column {column!r} is empty")
    return value


def chat(system: str | None, user: str) -> Prompt:
    messages = [{"role": "system", "content": system}] if system else []
    return Prompt(messages=messages + [{"role": "user", "content": user}])
