"""Extract task: a `text` column -> the fields a JSON schema defines (product, sentiment, entities, ...), answered
through guided decoding; the schema's top-level properties become typed columns (genfarm/structured.py).

The schema is the job's (`task.schema`, inline or a file) or, online, the serve config's or the request's. The model
sees the fields with their types and descriptions; the answer is parsed and validated against the schema, and one
that is not valid (cut at max_tokens, say) is the row's `invalid_output` error.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

import pyarrow as pa
from pydantic import AliasChoices, BaseModel, Field, field_validator

from genfarm.rows import Prompt, chat, text_field
from genfarm.serve.protocol import SamplingParams, Usage
from genfarm.structured import check_schema, load_schema, parse_json, schema_columns
from genfarm.task import MappedTaskConfig, Online, Route, RowSampling, Task

SYSTEM = "You extract information from texts. You copy facts from the text and never invent them."


def object_schema(schema: dict) -> dict:
    """A schema whose top-level properties can be columns: an object with at least one property."""
    properties = schema.get("properties")
    if schema.get("type") != "object" or not isinstance(properties, dict) or not properties:
        raise ValueError("the schema must describe an object with properties (they become the columns). Fix: write "
                         "e.g. {type: object, properties: {product: {type: string}}, required: [product]}")
    return schema


class ExtractConfig(MappedTaskConfig):
    type: Literal["extract"]
    menu_order = 50
    json_schema: dict = Field(
        validation_alias=AliasChoices("schema", "json_schema"), serialization_alias="schema",
        description="The fields to extract: a JSON schema of an object (inline, or the path of a .json/.yaml file); "
        "its top-level properties become typed columns. In a serve config, the default of requests that give none.")
    instructions: str | None = Field(None, description="What to extract and how, shown to the model before the "
                                     "fields, e.g. 'Extract the product a customer review is about.'")

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema(cls, value: Any) -> dict:
        return object_schema(load_schema(value))


class ExtractionRequest(SamplingParams):
    text: str = Field(min_length=1)
    json_schema: dict | None = Field(None, alias="schema", description="The fields to extract, as a JSON schema of "
                                     "an object; default: the serve config's tasks.extract.schema.")
    instructions: str | None = None
    model: str | None = None

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, value: dict | None) -> dict | None:
        if value is None:
            return None
        check_schema(value)  # inline only: a request names no file on the server
        return object_schema(value)


class ExtractionResponse(BaseModel):
    id: str
    object: Literal["extraction"] = "extraction"
    model: str
    data: dict = Field(description="The extracted fields, valid against the schema.")
    text: str = Field(description="The model's answer as it came (JSON).")
    finish_reason: str | None
    usage: Usage


class Extract(Task):
    Config = ExtractConfig
    route = Route("/v1/extractions", ExtractionRequest, ExtractionResponse,
                  "Extract the fields of a JSON schema from a text (the batch `extract` task)")
    quality_defaults = {"repetition": False, "empty": False}  # the answer is JSON that the schema checks
    config: ExtractConfig

    def output_schema(self) -> dict[str, pa.DataType]:
        return schema_columns(self.config.json_schema)

    def required_columns(self) -> list[str]:
        return [self.config.columns.get("text", "text")]

    def prompt(self, row: dict) -> Prompt:
        text = text_field(row, "text", self.config.columns)
        schema = self.config.json_schema
        required = set(schema.get("required", ()))
        fields = "\n".join(describe_field(name, prop, name in required)
                           for name, prop in schema["properties"].items())
        task = self.config.instructions or "Extract these fields from the text."
        return chat(self.config.system_prompt or SYSTEM,
                    f"{task}\n\nFields:\n{fields}\n\nText:\n{text}\n\nAnswer in JSON with these fields.")

    def sampling(self, row: dict) -> RowSampling:
        return RowSampling(structured={"json": self.config.json_schema, "disable_any_whitespace": True})

    def parse(self, row: dict, text: str) -> dict:
        return parse_json(text, self.config.json_schema)

    def summary(self, ledger) -> dict:
        """How many results have each field filled (not null)."""
        names = list(self.config.json_schema["properties"])
        table = ledger.read(columns=names)
        if table is None:
            return {"fields_filled": dict.fromkeys(names, 0)}
        return {"fields_filled": {name: table.num_rows - table[name].null_count for name in names}}

    async def respond(self, row: dict, online: Online) -> ExtractionResponse:
        updates = {key: row[key] for key in ("json_schema", "instructions") if row.get(key) is not None}
        task = Extract(self.config.model_copy(update=updates)) if updates else self
        ids = online.encode(task.prompt(row), param="text")
        [[completion]] = await online.complete([ids], task.sampling(row))
        text, reason = completion.text, completion.finish_reason
        task.parse(row, text)  # valid against the schema, else the request's invalid_output error
        return ExtractionResponse(id=f"extract-{uuid.uuid4().hex}", model=online.model, data=json.loads(text),
                                  text=text, finish_reason=reason, usage=online.usage([ids]))


def describe_field(name: str, prop: Any, required: bool) -> str:
    """One line of the field list the model sees: `- name (type, optional): description`."""
    prop = prop if isinstance(prop, dict) else {}
    if "enum" in prop:
        kind = "one of: " + ", ".join(json.dumps(value) for value in prop["enum"])
    elif prop.get("type") == "array" and isinstance(prop.get("items"), dict) and "type" in prop["items"]:
        kind = f"list of {prop['items']['type']}"
    else:
        kind = prop.get("type") if isinstance(prop.get("type"), str) else "value"
    line = f"- {name} ({kind}{'' if required else ', optional'})"
    return f"{line}: {prop['description']}" if prop.get("description") else line
