"""A structured answer asked for on the OpenAI routes (response_format, structured_outputs, guided_*), as the one
constraint vLLM's guided decoding takes, or an OpenAI-style 400 naming the parameter."""

from __future__ import annotations

from genfarm.serve import protocol as api
from genfarm.serve.responses import APIError
from genfarm.structured import check_regex, check_schema

WAYS = ("response_format", "structured_outputs", "guided_json", "guided_choice", "guided_regex")


def constraint(body: api.Constraints) -> dict | None:
    """{"json": schema} | {"json_object": True} | {"choice": [...]} | {"regex": ...} | {"grammar": ...} | None."""
    given = [way for way in WAYS if getattr(body, way) is not None
             and not (way == "response_format" and body.response_format.type == "text")]
    if len(given) > 1:
        raise APIError(400, f"give one of {', '.join(given)}, not several", param=given[1], code="invalid_parameter")
    if not given:
        return None
    way = given[0]
    if way == "response_format":
        return response_format(body.response_format)
    if way == "structured_outputs":
        chosen = body.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        if len(chosen) != 1:
            raise APIError(400, "structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
                           param=way, code="invalid_parameter")
        [(kind, value)] = chosen.items()
        return {kind: checked(kind, value, f"{way}.{kind}")}
    kind = {"guided_json": "json", "guided_choice": "choice", "guided_regex": "regex"}[way]
    return {kind: checked(kind, getattr(body, way), way)}


def response_format(format: api.ResponseFormat) -> dict:
    """OpenAI's JSON modes as compact JSON: without whitespace between tokens, a small model cannot wander off into
    blank lines until max_tokens (and the answer costs fewer tokens)."""
    if format.type == "json_object":
        return {"json_object": True, "disable_any_whitespace": True}
    if format.json_schema is None or format.json_schema.schema_ is None:
        raise APIError(400, "response_format json_schema needs json_schema.schema, a JSON schema",
                       param="response_format.json_schema", code="invalid_parameter")
    return {"json": checked("json", format.json_schema.schema_, "response_format"), "disable_any_whitespace": True}


def checked(kind: str, value, param: str):
    """The constraint's value, refused with a 400 when it cannot be one (a schema that is none, a bad regex)."""
    try:
        if kind == "json" and not isinstance(value, str):
            check_schema(value)
        elif kind == "regex":
            check_regex(value)
    except ValueError as err:
        raise APIError(400, str(err).replace(". Fix: ", "; "), param=param, code="invalid_parameter") from None
    return value
