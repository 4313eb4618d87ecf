"""/openapi.json as exact as the service: what a request may hold is what the service takes.

FastAPI describes the request models; what only the served config knows is added here: the one model name served,
n > 1 only when sampling (vLLM refuses several greedy samples), one text per task request, non-blank task fields,
the API key, 400 (not FastAPI's 422) for a bad request and 413 for a body over limits.max_body_bytes. Clients
generated from it, and fuzzers, then send what is answered.

A task whose request needs more than its model says (a field required unless the serve config sets it, values from
a table of its own) says it with a classmethod `describe_request(schema: dict, config)` that edits its request's
JSON schema (genfarm/serve/patterns.py writes patterns that JSON Schema and Python's re read alike).
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi.openapi.utils import get_openapi

from genfarm.serve.auth import OPEN_PATHS
from genfarm.serve.patterns import NOT_BLANK, branches
from genfarm.serve.protocol import INT64, SamplingParams
from genfarm.serve.replica import ReplicaState
from genfarm.task import task_classes

GREEDY = 1e-5  # vLLM samples greedily below this temperature, and then refuses n > 1
ERROR = {"$ref": "#/components/schemas/ErrorBody"}


def exact_openapi(app, spec, routes: dict) -> Callable[[], dict]:
    """app.openapi for the service of `spec` whose task routes are `routes` (task name -> Route). Built at the first
    request for it, in the replica, which knows whether API keys are set."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            describe(schema, spec, {route.path: name for name, route in routes.items()}, bool(ReplicaState.keys))
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def describe(schema: dict, spec, task_paths: dict[str, str], keyed: bool) -> None:
    components = schema.setdefault("components", {})
    models = components.get("schemas", {})
    if keyed:
        components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer",
                                                    "description": "Authorization: Bearer KEY"}}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)  # validation errors are answered 400, in OpenAI's shape
            if keyed and path not in OPEN_PATHS:
                operation["security"] = [{"apiKey": []}]
                responses.setdefault("401", {"description": "Missing or invalid API key", **content(ERROR)})
            if "requestBody" not in operation:
                continue
            responses.setdefault("400", {"description": "Bad request", **content(ERROR)})
            ref = operation["requestBody"]["content"].get("application/json", {}).get("schema", {}).get("$ref")
            if ref is None:  # not a JSON body (an upload, held to batches.max_file_bytes as it streams: a 400)
                continue
            responses["413"] = {"description": "Body over limits.max_body_bytes", **content(ERROR)}
            request = models[ref.rsplit("/", 1)[-1]]
            served_model(request, spec.model.name)
            if path in task_paths:
                config = spec.tasks[task_paths[path]]
                task_request(request, config, task_classes()[config.type])
            else:
                sample_only_when_several(request, spec.sampling.temperature)
    for model in models.values():
        drop_null_defaults(model)
        exact_bounds(model)


def content(ref: dict) -> dict:
    return {"content": {"application/json": {"schema": ref}}}


def served_model(request: dict, name: str) -> None:
    """`model` may only name the served model (the service answers model_not_found otherwise)."""
    prop = request.get("properties", {}).get("model")
    if prop is None:
        return
    for branch in branches(prop, "string"):
        branch["enum"] = [name]


def sample_only_when_several(request: dict, default_temperature: float) -> None:
    """n > 1 needs a sampling temperature: vLLM refuses several greedy samples (the config's temperature applies when
    a request leaves it out)."""
    sampling = {"type": "number", "minimum": GREEDY}
    then = {"properties": {"temperature": sampling if default_temperature < GREEDY else
                           {"anyOf": [sampling, {"type": "null"}]}}}
    if default_temperature < GREEDY:
        then["required"] = ["temperature"]
    request["if"] = {"properties": {"n": {"minimum": 2}}, "required": ["n"]}
    request["then"] = then


def task_request(request: dict, config, task: type) -> None:
    """A task request: one text (n is 1) and every text field non-blank (the checks of a batch row); then what the
    task itself says, knowing its config (its class's `describe_request`)."""
    props = request.get("properties", {})
    if "n" in props:
        props["n"]["maximum"] = 1
    for name, prop in props.items():
        if name not in SamplingParams.model_fields and name != "model":
            for branch in branches(prop, "string"):
                branch["pattern"] = NOT_BLANK
    task.describe_request(request, config)


def exact_bounds(model: dict) -> None:
    """FastAPI writes every bound as a float: integers get theirs back, and the seed's int64 range exactly (as a
    float it would round 2**63 - 1 up, out of range)."""
    for name, prop in model.get("properties", {}).items():
        for branch in branches(prop, "integer"):
            for bound in ("minimum", "maximum"):
                if bound in branch:
                    branch[bound] = int(branch[bound])
            if name == "seed":
                branch["minimum"], branch["maximum"] = -INT64, INT64 - 1


def drop_null_defaults(model: dict) -> None:
    """A field that may be left out but not sent as null: no `default: null` the schema would then refuse."""
    for prop in model.get("properties", {}).values():
        nullable = prop.get("type") == "null" or any(b.get("type") == "null" for b in prop.get("anyOf", []))
        if "default" in prop and prop["default"] is None and not nullable:
            del prop["default"]
