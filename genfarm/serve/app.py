"""The Ray Serve application: a FastAPI app (errors in OpenAI's shape, API keys, the routes) whose replicas are
GenfarmServer instances, each the HTTP ingress and holder of its own vLLM async engine.

The app is made per serve config, because its task routes come from the configured tasks (plugins included), and
Serve freezes an ingress app when the deployment is made.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from genfarm import __version__
from genfarm.serve.auth import RequireApiKey
from genfarm.serve.batches import router as batch_router
from genfarm.serve.config import ServeSpec
from genfarm.serve.metrics import MetricsHub
from genfarm.serve.replica import ReplicaState, route_label
from genfarm.serve.responses import APIError, Call
from genfarm.serve.routes import route_labels, router, task_router
from genfarm.serve.server import GenfarmServer
from genfarm.task import Route, task_classes


async def _api_error(request: Request, err: APIError) -> JSONResponse:
    return err.response()


async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    """A bug of ours still answers in OpenAI's shape, and counts; the traceback goes to the replica's log."""
    error = APIError(500, f"internal error ({type(err).__name__}); the replica's log has the details",
                     kind="server_error", code="internal_error")
    if ReplicaState.metrics is not None:
        Call(route_label(request.app, request.url.path), ReplicaState.metrics).error(error)
    return error.response()


async def _invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 becomes OpenAI's 400, naming the parameter."""
    first = err.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid" or param is None:
        error = APIError(400, "the request body is not a JSON object; send JSON with Content-Type: application/json",
                         code="invalid_json")
    elif first.get("type") == "extra_forbidden":
        error = APIError(400, f"unsupported parameter {param!r}; remove it (see /docs for the parameters genfarm "
                         "accepts)", param=param, code="invalid_parameter")
    else:
        error = APIError(400, f"{param}: {first.get('msg')}", param=param, code="invalid_parameter")
    if ReplicaState.metrics is not None:
        Call(route_label(request.app, request.url.path), ReplicaState.metrics).error(error)
    return error.response()


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
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_middleware(RequireApiKey)
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
