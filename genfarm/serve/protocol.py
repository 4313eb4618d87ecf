"""Request and response bodies of the HTTP API: the OpenAI subset genfarm serves, and what task endpoints share
(each task module declares its own request and response).

Requests forbid unknown fields, so an unsupported OpenAI parameter is a 400 that names it rather than a setting that
silently does nothing. They are strict JSON: no number as a string, no NaN, every string valid Unicode, numbers in
the range the engine takes, JSON nested at most MAX_DEPTH levels; so what /openapi.json describes is what a request
may hold.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

INT64 = 2**63
MAX_TOKENS = 2**31 - 1  # generation also ends at the model's context length
MAX_DEPTH = 32  # JSON levels under a request's top level: a JSON schema nests far less
SURROGATE = re.compile(r"[\ud800-\udfff]")  # only a lone one survives json.loads: a pair becomes one character


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _text_and_depth(cls, data: Any) -> Any:
        """Every string (keys too) must be Unicode text that can be tokenized and answered in UTF-8, and free-form
        JSON (a schema) must not nest deeper than MAX_DEPTH: both are refused before anything recurses into them."""
        problem = _unusable(data, [], 0)
        if problem is not None:
            path, kind, message = problem
            raise PydanticCustomError(kind, message, {"path": path})
        return data


def _unusable(value: Any, path: list, depth: int) -> tuple[list, str, str] | None:
    """(path, error type, message) of the first string that is not text or the first level past MAX_DEPTH."""
    if isinstance(value, str):
        return (path, "invalid_unicode", "holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text; send "
                "valid Unicode") if SURROGATE.search(value) else None
    if isinstance(value, (dict, list)):
        if depth >= MAX_DEPTH:
            return path[:1], "too_deep", f"nests deeper than {MAX_DEPTH} levels of JSON"
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and SURROGATE.search(key):
                return path, "invalid_unicode", "a key holds a lone UTF-16 surrogate, which is not text"
            problem = _unusable(item, [*path, key], depth + 1)
            if problem is not None:
                return problem
    return None


Text = Annotated[str, Field(min_length=1)]
# Integers, also when written as JSON Schema allows (2.0), never as a string or a boolean; the bounds come first so
# that the JSON schema carries them.
INTEGRAL = BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS), INTEGRAL]
Seed = Annotated[int, Field(ge=-INT64, le=INT64 - 1), INTEGRAL]
Samples = Annotated[int, Field(ge=1, le=16), INTEGRAL]


class StreamOptions(Body):
    include_usage: bool = False


class SamplingParams(Body):
    """Parameters every generation endpoint takes; left out, they come from the serve config's `sampling`."""

    max_tokens: MaxTokens | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: Samples = 1
    seed: Seed | None = None
    stop: Text | list[Text] | None = None
    user: str | None = Field(None, description="Accepted for compatibility; not used.")


class JsonSchemaFormat(Body):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict = Field(alias="schema", description="The JSON schema the answer follows (required here).")
    strict: bool | None = None


class ResponseFormat(Body):
    """OpenAI's response_format: free text, any JSON object, or JSON following a schema (guided decoding)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    model_config = ConfigDict(json_schema_extra={"if": {"properties": {"type": {"const": "json_schema"}}},
                                                 "then": {"required": ["json_schema"],
                                                          "properties": {"json_schema": {"type": "object"}}}})

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema: {name, schema}")
        return self


class StructuredOutputs(Body):
    """vLLM's structured_outputs: exactly one of json (a schema), regex, choice, grammar (EBNF), json_object."""

    json_: dict | str = Field(None, alias="json")
    regex: str = None
    choice: list[str] = Field(None, min_length=1)
    grammar: str = None
    json_object: Literal[True] = None

    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "maxProperties": 1})


def _one_way(schema: dict) -> None:
    """JSON schema of Constraints: no two ways given at once (a text response_format asks for nothing)."""
    ways = ("response_format", "structured_outputs", "guided_json", "guided_choice", "guided_regex")
    not_text = {"response_format": {"properties": {"type": {"not": {"const": "text"}}}}}
    schema["not"] = {"anyOf": [{"required": [a, b], **({"properties": not_text} if a == "response_format" else {})}
                               for i, a in enumerate(ways) for b in ways[i + 1:]]}


class Constraints(Body):
    """Ways to ask for a structured answer on the OpenAI routes: OpenAI's response_format, vLLM's
    structured_outputs and its older guided_* parameters. At most one may be given (a text response_format asks
    for nothing)."""

    model_config = ConfigDict(json_schema_extra=_one_way)

    response_format: ResponseFormat = None
    structured_outputs: StructuredOutputs = None
    guided_json: dict | str = None
    guided_choice: list[str] = Field(None, min_length=1)
    guided_regex: str = None


class TextPart(Body):
    type: Literal["text"]
    text: str


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)

    def for_template(self) -> dict:
        """The message as chat templates take it: OpenAI's newer `developer` role is the system message."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class ChatRequest(SamplingParams, Constraints):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = Field(None, description="Newer name of max_tokens.")
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(SamplingParams, Constraints):
    model: str
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)] = Field(
        description="One prompt (a list holding one prompt is accepted too).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerationHead(BaseModel):
    """Fields every OpenAI generation response carries."""

    id: str
    created: int
    model: str
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(GenerationHead):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatResponse(GenerationHead):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "genfarm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
