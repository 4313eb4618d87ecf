"""The HTTP routes: health, metrics, the OpenAI subset (models, chat completions, completions), and one route per
task, made from the task registry (each task module declares its path, request and response)."""

import time
import uuid

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from genfarm.rows import Prompt
from genfarm.serve import protocol as api
from genfarm.serve.constraints import constraint
from genfarm.serve.replica import current_server
from genfarm.serve.responses import APIError, ChatChunks, TextChunks, usage
from genfarm.serve.server import GenfarmServer, direct_url
from genfarm.task import Route

# No `from __future__ import annotations` here: FastAPI reads the task routes' body types from their annotations,
# which are made in a loop and must be real classes, not names.

ERRORS_DOC = {code: {"model": api.ErrorBody} for code in (400, 401, 404, 429, 503, 504)}
STREAM_DOC = {"content": {"text/event-stream": {}}, "description": "With `stream: true`: server-sent events."}
OPENAI_LABELS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models"}

router = APIRouter()
Server = Depends(current_server)


@router.get("/health", summary="200 when the engine answers, else 503")
async def health(server: GenfarmServer = Server):
    try:
        await server.engine.check_health()
    except Exception as err:  # noqa: BLE001 - any engine failure means unhealthy
        return APIError(503, f"engine unhealthy: {err}", kind="service_unavailable").response()
    return {"status": "ok", "model": server.spec.model.name, "replica": server.replica, "direct_url": direct_url()}


@router.get("/metrics", summary="Prometheus metrics summed over every replica", response_class=PlainTextResponse)
async def metrics_page(server: GenfarmServer = Server):
    await server.hub.push.remote(server.replica, server.metrics.snapshot())
    return PlainTextResponse(await server.hub.render.remote(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", response_model=api.ModelList, responses=ERRORS_DOC)
async def list_models(server: GenfarmServer = Server):
    server.start("models", None).finish(200)
    return api.ModelList(data=[model_card(server)])


@router.get("/v1/models/{model:path}", response_model=api.ModelCard, responses=ERRORS_DOC)
async def retrieve_model(model: str, server: GenfarmServer = Server):
    server.start("models", model).finish(200)  # another model's name: 404 model_not_found
    return model_card(server)


def model_card(server: GenfarmServer) -> api.ModelCard:
    return api.ModelCard(id=server.spec.model.name, created=int(time.time()),
                         max_model_len=server.spec.engine.max_model_len)


@router.post("/v1/chat/completions", responses={200: {"model": api.ChatResponse, **STREAM_DOC}, **ERRORS_DOC})
async def chat_completions(body: api.ChatRequest, server: GenfarmServer = Server):
    call = server.start("chat", body.model)
    extra = {"structured": structured(call, body)}
    messages = [m.for_template() for m in body.messages]
    sampling = server.sampling(body, body.max_completion_tokens or body.max_tokens)
    ids = server.encode(call, Prompt(messages=messages), sampling)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    model = server.spec.model.name
    if body.stream:
        return await server.stream(call, ids, sampling, body.seed, ChatChunks(rid, model),
                                   include_usage=bool(body.stream_options and body.stream_options.include_usage),
                                   extra=extra)
    [completions] = await server.complete(call, [ids], sampling, body.seed, extra)
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "finish_reason": c.finish_reason, "logprobs": None} for c in completions],
            "usage": usage(len(ids), call.tokens)}


@router.post("/v1/completions", responses={200: {"model": api.CompletionResponse, **STREAM_DOC}, **ERRORS_DOC})
async def completions(body: api.CompletionRequest, server: GenfarmServer = Server):
    call = server.start("completions", body.model)
    extra = {"structured": structured(call, body)}
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise call.error(APIError(400, f"prompt holds {len(prompts)} prompts; send one prompt per request",
                                  param="prompt", code="invalid_parameter"))
    sampling = server.sampling(body, body.max_tokens)
    ids = server.encode(call, Prompt(text=prompts[0]), sampling)
    rid = f"cmpl-{uuid.uuid4().hex}"
    echo = prompts[0] if body.echo else ""
    model = server.spec.model.name
    if body.stream:
        return await server.stream(call, ids, sampling, body.seed, TextChunks(rid, model, echo),
                                   include_usage=bool(body.stream_options and body.stream_options.include_usage),
                                   extra=extra)
    [completions] = await server.complete(call, [ids], sampling, body.seed, extra)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "text": echo + c.text, "finish_reason": c.finish_reason, "logprobs": None}
                        for c in completions],
            "usage": usage(len(ids), call.tokens)}


def structured(call, body: api.Constraints) -> dict | None:
    """The request's structured-output constraint; a bad one is a 400 counted in the metrics."""
    try:
        return constraint(body)
    except APIError as err:
        raise call.error(err) from None


def task_router(routes: dict[str, Route]) -> APIRouter:
    """POST route of every task the service answers (by task name), with the task's own request and response."""
    tasks_router = APIRouter()
    for name, route in routes.items():
        tasks_router.add_api_route(route.path, task_endpoint(name, route.request), methods=["POST"],
                                   response_model=route.response, responses=ERRORS_DOC, summary=route.summary or None,
                                   name=name)
    return tasks_router


def task_endpoint(name: str, request: type):
    async def endpoint(body: request, server: GenfarmServer = Server):
        return await server.answer_task(name, body)

    return endpoint


def route_labels(routes: dict[str, Route]) -> dict[str, str]:
    """Metrics label of every served path (the last part of a task's path: /v1/articles -> articles)."""
    return {**OPENAI_LABELS, **{route.path: route.path.rsplit("/", 1)[-1] for route in routes.values()}}
