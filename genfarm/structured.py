"""Structured outputs: a JSON schema, a list of choices or a regular expression that the engine's guided decoding
enforces (vLLM's structured outputs), and the check that what came back really is one, as typed columns.

Guided decoding makes the text follow the grammar while it is generated, but a text cut at max_tokens is still
incomplete: every answer is parsed and validated, and one that fails is the row's `invalid_output` error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pyarrow as pa
import yaml

from genfarm.rows import RowError

SCALAR_TYPES = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}
MAX_SHOWN = 200  # characters of a bad answer quoted in its error message


def load_schema(value: dict | str) -> dict:
    """A JSON schema given inline (a mapping) or as the path of a JSON or YAML file; ValueError with a fix if it is
    none (for job files and serve configs, whose validators turn it into a one-line error)."""
    if isinstance(value, str):
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{value} is neither a schema nor a file. Fix: give the JSON schema inline or the path "
                             "of a .json/.yaml file holding it")
        try:
            value = yaml.safe_load(path.read_text())  # YAML reads JSON too
        except yaml.YAMLError as err:
            raise ValueError(f"{value} is not valid JSON or YAML ({err}). Fix: correct the schema file") from None
    check_schema(value)
    return value


def check_schema(schema: Any) -> None:
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema is a mapping, got {type(schema).__name__}. Fix: write e.g. "
                         "{type: object, properties: {title: {type: string}}}")
    if "$schema" in schema and not isinstance(schema["$schema"], str):  # jsonschema would fail with a TypeError
        raise ValueError("the JSON schema's $schema is not a URI. Fix: leave $schema out, or give a dialect's URI "
                         "such as https://json-schema.org/draft/2020-12/schema")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        where = "/".join(map(str, err.absolute_path)) or "(top)"
        raise ValueError(f"not a valid JSON schema at {where}: {err.message}. Fix: see json-schema.org") from None
    if (where := huge_integer(schema)) is not None:  # the engine's messages carry 64-bit integers at most
        raise ValueError(f"the JSON schema has an integer beyond 64 bits at {where or '(top)'}. Fix: use a smaller "
                         "number (or a float)")


def huge_integer(value: Any, path: str = "") -> str | None:
    """The path of the first integer in `value` outside [-2**63, 2**64 - 1], or None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return path if not -2**63 <= value < 2**64 else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if (found := huge_integer(item, f"{path}/{key}" if path else str(key))) is not None:
            return found
    return None


def schema_columns(schema: dict) -> dict[str, pa.DataType]:
    """Typed output columns of an object schema's top-level properties: scalars as themselves, the rest (arrays,
    objects, unions) as JSON text that DuckDB's and pandas' JSON functions read."""
    columns = {}
    for name, prop in (schema.get("properties") or {}).items():
        kind = prop.get("type") if isinstance(prop, dict) else None
        if kind is None and isinstance(prop, dict) and "enum" in prop and all(isinstance(v, str) for v in prop["enum"]):
            kind = "string"
        columns[name] = SCALAR_TYPES.get(kind, pa.string()) if isinstance(kind, str) else pa.string()
    return columns


def parse_json(text: str, schema: dict) -> dict:
    """The answer as a validated JSON value; its top-level properties as column values (see schema_columns)."""
    try:
        value = json.loads(text, strict=False)  # a control character inside a string is still the answer
    except json.JSONDecodeError as err:
        raise RowError("invalid_output", f"not JSON ({err.msg} at character {err.pos}): {shown(text)}") from None
    errors = sorted(jsonschema.validators.validator_for(schema)(schema).iter_errors(value), key=lambda e: e.path)
    if errors:
        where = "/".join(map(str, errors[0].absolute_path)) or "(top)"
        raise RowError("invalid_output", f"does not match the schema at {where}: {errors[0].message}")
    if not isinstance(value, dict):
        return {}
    columns = schema_columns(schema)
    return {name: value.get(name) if columns[name] != pa.string() or isinstance(value.get(name), str | None)
            else json.dumps(value[name], ensure_ascii=False) for name in columns}


def parse_choice(text: str, choices: list[str]) -> str:
    answer = text.strip()
    if answer not in choices:
        raise RowError("invalid_output", f"{shown(answer)} is not one of the choices {choices}")
    return answer


def parse_regex(text: str, pattern: str) -> str:
    if re.fullmatch(pattern, text) is None:
        raise RowError("invalid_output", f"{shown(text)} does not match {pattern!r}")
    return text


def check_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"not a valid regular expression ({err}). Fix: correct the pattern") from None
    return pattern


def shown(text: str) -> str:
    return repr(text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "…")
