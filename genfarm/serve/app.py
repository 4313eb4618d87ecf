"""The Ray Serve application: a FastAPI app (errors in OpenAI's shape, API keys, the routes) whose replicas are
GenfarmServer instances, each the HTTP ingress and holder of its own vLLM async engine.

The app is made per serve config, because its task routes come from the configured tasks (plugins included), and
Serve freezes an ingress app when the deployment is made.
"""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException

from genfarm import __version__
from genfarm.serve.auth import RequireApiKey
from genfarm.serve.batches import router as batch_router
from genfarm.serve.bodylimit import BodyLimit
from genfarm.serve.config import ServeSpec
from genfarm.serve.metrics import MetricsHub
from genfarm.serve.openapi import exact_openapi
from genfarm.serve.replica import ReplicaState, route_label
from genfarm.serve.responses import APIError, Call
from genfarm.serve.routes import route_labels, router, task_router
from genfarm.serve.server import GenfarmServer
from genfarm.task import Route, task_classes


async def _api_error(request: Request, err: APIError) -> JSONResponse:
    return err.response()


def _counted(request: Request, error: APIError) -> JSONResponse:
    if ReplicaState.metrics is not None:
        Call(route_label(request.app, request.url.path), ReplicaState.metrics).error(error)
    return error.response()


async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    """A bug of ours still answers in OpenAI's shape, and counts; the traceback goes to the replica's log."""
    if isinstance(err, RecursionError):  # something recursed into what a request sent
        return _counted(request, APIError(400, "the request nests too deeply", code="invalid_request"))
    return _counted(request, APIError(500, f"internal error ({type(err).__name__}); the replica's log has the "
                                      "details", kind="server_error", code="internal_error"))


UNREADABLE = {  # why FastAPI could not parse a body (its 400 "There was an error parsing the body")
    UnicodeDecodeError: "the request body is not UTF-8 text; send JSON in UTF-8",
    RecursionError: "the request body nests JSON too deeply to parse",
}
HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
              415: "unsupported_media_type"}


async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own errors (an unknown path, a method the path does not take, an unparsable
    body) in OpenAI's shape too, keeping their headers (405's Allow)."""
    if err.status_code == 404:
        message = f"no such route: {request.method} {request.url.path} (see /docs)"
    elif err.status_code == 405:
        message = f"{request.url.path} does not take {request.method} (it takes {err.headers.get('Allow', '?')})" \
            if err.headers else f"{request.url.path} does not take {request.method}"
    elif err.status_code == 400 and err.__cause__ is not None:
        message = next((text for kind, text in UNREADABLE.items() if isinstance(err.__cause__, kind)),
                       f"the request body could not be parsed ({type(err.__cause__).__name__}); send a JSON object")
    else:
        message = str(err.detail)
    code = "invalid_json" if err.status_code == 400 and err.__cause__ is not None else HTTP_CODES.get(err.status_code)
    kind = "invalid_request_error" if err.status_code < 500 else "server_error"
    response = _counted(request, APIError(err.status_code, message, kind=kind, code=code))
    response.headers.update(err.headers or {})
    return response


TYPE_LABEL = re.compile(r"str|int|float|bool|dict|list|none|.*[^a-z0-9_].*")  # a union member in a loc, no field


async def _invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 becomes OpenAI's 400, naming the parameter (the fields where a union's members all failed)."""
    errors = err.errors()
    first = errors[0]
    extra = first.get("type") == "extra_forbidden"  # its last part is the key sent, whatever its spelling
    loc = param_path([*first.get("loc", ()), *(first.get("ctx") or {}).get("path", ())], keep_last=extra)
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        error = APIError(400, f"the request body is not valid JSON ({(first.get('ctx') or {}).get('error')}); send "
                         "JSON with Content-Type: application/json", code="invalid_json")
    elif param is None and first.get("type") in ("missing", "model_type", "model_attributes_type", "dict_type"):
        error = APIError(400, "the request body is missing or not a JSON object; send JSON with Content-Type: "
                         "application/json", code="invalid_json")
    elif extra:
        error = APIError(400, f"unsupported parameter {param!r}; remove it (see /docs for the parameters genfarm "
                         "accepts)", param=param, code="invalid_parameter")
    else:
        messages = dict.fromkeys(e.get("msg") for e in errors if param_path(e.get("loc", ())) == loc)
        where = f"{param}: " if param else "the request body: "
        error = APIError(400, where + " or ".join(filter(None, messages)) if len(messages) > 1 else
                         where + str(first.get("msg")), param=param, code="invalid_parameter")
    return _counted(request, error)


def param_path(loc, keep_last: bool = False) -> list[str]:
    """A pydantic error location as the request's field path: without 'body' and the names of union members."""
    parts = [str(p) for p in loc[1:len(loc) - keep_last] if isinstance(p, int) or not TYPE_LABEL.fullmatch(p)]
    return parts + [str(loc[-1])] if keep_last and len(loc) > 1 else parts


def served_routes(spec: ServeSpec) -> dict[str, Route]:
    """The HTTP route of every configured task that has one, by task name."""
    classes = task_classes()
    return {name: classes[config.type].route for name, config in spec.tasks.items()
            if classes[config.type].route is not None}


def create_app(spec: ServeSpec) -> FastAPI:
    routes = served_routes(spec)
    names = ", ".join(route.path.rsplit("/", 1)[-1] for route in routes.values())
    app = FastAPI(title="genfarm", version=__version__,
                  description=f"OpenAI-compatible text generation plus genfarm's tasks ({names}), on vLLM. "
                  "Send `Authorization: Bearer KEY` when the service has API keys.")
    app.state.route_labels = route_labels(routes)
    app.openapi = exact_openapi(app, spec, routes)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(BodyLimit, max_bytes=spec.limits.max_body_bytes, max_upload_bytes=spec.batches.max_file_bytes)
    app.add_middleware(RequireApiKey)  # the outermost: no key, no reading of the body
    app.include_router(router)
    app.include_router(task_router(routes))
    app.include_router(batch_router)
    return app


def build_app(spec: ServeSpec):
    """The bound Serve application: the engine replicas plus one MetricsHub."""
    from genfarm.serve.deploy import server_options

    hub = serve.deployment(MetricsHub, name="MetricsHub", num_replicas=1, ray_actor_options={"num_cpus": 0}).bind()
    server = serve.deployment(name="GenfarmServer")(serve.ingress(create_app(spec))(GenfarmServer))
    return server.options(**server_options(spec)).bind(spec.model_dump(mode="json"), hub)


def build(args: dict):
    """Entry point of Serve configs (import_path: genfarm.serve.app:build): `args` is a serve config mapping."""
    return build_app(ServeSpec.model_validate(args or {}))
