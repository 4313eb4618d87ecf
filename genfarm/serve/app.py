"""The Ray Serve application: each GenfarmServer replica is the HTTP ingress and holds its own vLLM async engine.

Ingress and engine share a replica on purpose: a request crosses the Serve proxy once and then goes straight into the
engine, with no second hop through a deployment handle per request and per streamed chunk (the added latency Ray Serve
LLM is known for). Serve's proxy spreads requests over replicas; scaling replicas scales engines.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
import uuid
import weakref
from contextlib import aclosing

import psutil
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve

from genfarm import __version__
from genfarm.engine import AsyncEngine, InvalidRequest, PromptTooLong, use_gpu
from genfarm.errors import UserError
from genfarm.serve import protocol as api
from genfarm.serve.config import ServeSpec, api_keys, digest
from genfarm.serve.limits import Limiter, Overloaded, Slot
from genfarm.serve.metrics import MetricsHub, ReplicaMetrics
from genfarm.serve.responses import APIError, Call, ChatChunks, TextChunks, sse, usage
from genfarm.spec import SamplingSpec, TranslateTask
from genfarm.tasks import make_task
from genfarm.tasks.base import Prompt, RowError
from genfarm.tasks.translate import segment_prompt
from genfarm.translation import languages, reassemble, segment_document
from genfarm.translation.rows import segment_budget

PUSH_INTERVAL_S = 1.0  # how often a replica sends its counters to the MetricsHub
OPEN_PATHS = {"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}

app = FastAPI(
    title="genfarm",
    version=__version__,
    description="OpenAI-compatible text generation plus genfarm's article and translation tasks, on vLLM. "
    "Send `Authorization: Bearer KEY` when the service has API keys.",
)


class ReplicaState:
    """What the module-level middleware and error handlers need from this process's replica. A class, because
    Serve ships the FastAPI app to replicas as a copy while importable classes stay shared with the module."""

    keys: frozenset[str] = frozenset()  # sha256:HEX digests
    metrics: ReplicaMetrics | None = None


@app.exception_handler(APIError)
async def _api_error(request: Request, err: APIError) -> JSONResponse:
    return err.response()


@app.exception_handler(Exception)
async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    """A bug of ours still answers in OpenAI's shape, and counts; the traceback goes to the replica's log."""
    error = APIError(500, f"internal error ({type(err).__name__}); the replica's log has the details",
                     kind="server_error", code="internal_error")
    if ReplicaState.metrics is not None:
        Call(ROUTES.get(request.url.path, "other"), ReplicaState.metrics).error(error)
    return error.response()


@app.exception_handler(RequestValidationError)
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
        Call(ROUTES.get(request.url.path, "other"), ReplicaState.metrics).error(error)
    return error.response()


class RequireApiKey:
    """Checks the key before routing and body validation, so a caller without a valid key learns nothing else.
    Plain ASGI rather than BaseHTTPMiddleware, which would wrap every streamed chunk and hide client disconnects."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        keys = ReplicaState.keys
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # behind a route prefix, routes match without it: so must we
            path = path[len(root):]
        if keys and scope["type"] == "http" and path not in OPEN_PATHS:  # every other path needs a key
            headers = dict(scope["headers"])
            scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            presented = digest(key.strip())
            if scheme.lower() != "bearer" or not any(hmac.compare_digest(presented, k) for k in keys):
                error = APIError(401, "missing or invalid API key; send the header 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
                Call(ROUTES.get(scope["path"], "other"), ReplicaState.metrics).error(error)
                return await error.response()(scope, receive, send)
        await self.inner(scope, receive, send)


app.add_middleware(RequireApiKey)


ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/articles": "articles",
          "/v1/translations": "translations", "/v1/models": "models"}
ERRORS_DOC = {code: {"model": api.ErrorBody} for code in (400, 401, 429, 503, 504)}
STREAM_DOC = {"content": {"text/event-stream": {}}, "description": "With `stream: true`: server-sent events."}


# Above GenfarmServer on purpose: Serve copies the class's routes when it is decorated, with the globals known then.
def direct_url() -> str | None:
    """This replica's own HTTP address when Ray Serve's direct ingress is on (throughput mode): the same API without
    the proxy hop, for a client that can pick its replica (no load balancing there)."""
    low = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000"))
    high = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", "31000"))
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and low <= conn.laddr.port <= high:
            return f"http://{conn.laddr.ip}:{conn.laddr.port}"
    return None


@serve.deployment(name="GenfarmServer")
@serve.ingress(app)
class GenfarmServer:
    def __init__(self, config: dict, hub):
        import ray

        self.spec = spec = ServeSpec.model_validate(config)
        from genfarm import models

        gpu = use_gpu(spec.engine, len(ray.get_gpu_ids()))
        self.engine = AsyncEngine(models.resolve(spec.model.name, spec.model.revision), spec.engine, gpu)
        self.limiter = Limiter(spec.limits.concurrency(spec.engine), spec.limits.max_queued)
        self.metrics = ReplicaMetrics(lambda: self.limiter.running, lambda: self.limiter.waiting,
                                      self.engine.llm.get_num_unfinished_requests)
        ReplicaState.keys, ReplicaState.metrics = api_keys(spec), self.metrics
        self.hub, self.replica = hub, serve.get_replica_context().replica_id.unique_id
        self.tasks = {
            "article": make_task(spec.tasks.article.model_copy(update={"columns": {}})),
            "translate": make_task(spec.tasks.translate.model_copy(update={"columns": {}})),
        }
        self._pusher: asyncio.Task | None = None

    async def check_health(self) -> None:
        """Serve's periodic health check: a replica whose engine died is replaced."""
        await self.engine.check_health()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()  # stop the engine-core process with the replica

    # ---- routes -------------------------------------------------------------------------------------------------

    @app.get("/health", summary="200 when the engine answers, else 503")
    async def health(self):
        try:
            await self.engine.check_health()
        except Exception as err:  # noqa: BLE001 - any engine failure means unhealthy
            return APIError(503, f"engine unhealthy: {err}", kind="service_unavailable").response()
        return {"status": "ok", "model": self.spec.model.name, "replica": self.replica,
                "direct_url": direct_url()}

    @app.get("/metrics", summary="Prometheus metrics summed over every replica", response_class=PlainTextResponse)
    async def metrics_page(self):
        await self.hub.push.remote(self.replica, self.metrics.snapshot())
        return PlainTextResponse(await self.hub.render.remote(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=api.ModelList, responses=ERRORS_DOC)
    async def list_models(self):
        self.start("models", None).finish(200)
        card = api.ModelCard(id=self.spec.model.name, created=int(time.time()),
                             max_model_len=self.spec.engine.max_model_len)
        return api.ModelList(data=[card])

    @app.post("/v1/chat/completions", responses={200: {"model": api.ChatResponse, **STREAM_DOC}, **ERRORS_DOC})
    async def chat_completions(self, body: api.ChatRequest):
        call = self.start("chat", body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        max_tokens = body.max_completion_tokens or body.max_tokens
        sampling = self.sampling(body, max_tokens)
        ids = self.encode(call, Prompt(messages=messages), sampling)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return await self.stream(call, ids, sampling, body.seed, ChatChunks(rid, self.spec.model.name),
                                     include_usage=bool(body.stream_options and body.stream_options.include_usage))
        [(texts, reasons)] = await self.complete(call, [ids], sampling, body.seed)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.spec.model.name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                             "logprobs": None} for i, (text, reason) in enumerate(zip(texts, reasons))],
                "usage": usage(len(ids), call.tokens)}

    @app.post("/v1/completions", responses={200: {"model": api.CompletionResponse, **STREAM_DOC}, **ERRORS_DOC})
    async def completions(self, body: api.CompletionRequest):
        call = self.start("completions", body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise call.error(APIError(400, f"prompt holds {len(prompts)} prompts; send one prompt per request",
                                      param="prompt", code="invalid_parameter"))
        sampling = self.sampling(body, body.max_tokens)
        ids = self.encode(call, Prompt(text=prompts[0]), sampling)
        rid = f"cmpl-{uuid.uuid4().hex}"
        echo = prompts[0] if body.echo else ""
        if body.stream:
            return await self.stream(call, ids, sampling, body.seed, TextChunks(rid, self.spec.model.name, echo),
                                     include_usage=bool(body.stream_options and body.stream_options.include_usage))
        [(texts, reasons)] = await self.complete(call, [ids], sampling, body.seed)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.spec.model.name,
                "choices": [{"index": i, "text": echo + text, "finish_reason": reason, "logprobs": None}
                            for i, (text, reason) in enumerate(zip(texts, reasons))],
                "usage": usage(len(ids), call.tokens)}

    @app.post("/v1/articles", response_model=api.ArticleResponse, responses=ERRORS_DOC,
              summary="Write an article about a topic (the batch `article` task)")
    async def articles(self, body: api.ArticleRequest) -> api.ArticleResponse:
        call = self.start("articles", body.model)
        row = body.model_dump(include={"topic", "audience", "length", "style", "language"}, exclude_none=True)
        sampling = self.sampling(body, body.max_tokens)
        ids = self.encode(call, self.task_prompt(call, "article", row, body), sampling)
        [([text], [reason])] = await self.complete(call, [ids], sampling, body.seed)
        return api.ArticleResponse(id=f"article-{uuid.uuid4().hex}", model=self.spec.model.name, topic=body.topic,
                                   text=text, finish_reason=reason, usage=usage(len(ids), call.tokens),
                                   **self.tasks["article"].columns(row, text))

    @app.post("/v1/translations", response_model=api.TranslationResponse, responses=ERRORS_DOC,
              summary="Translate a text (the batch `translate` task)")
    async def translations(self, body: api.TranslationRequest) -> api.TranslationResponse:
        call = self.start("translations", body.model)
        row = body.model_dump(include={"text", "source_language", "target_language"}, exclude_none=True)
        self.task_prompt(call, "translate", row, body)  # the same checks as a batch row: text and languages given
        source, target = self.language_codes(call, *self.tasks["translate"].languages(row))
        sampling = self.sampling(body, body.max_tokens)
        spec = self.tasks["translate"].spec.model_copy(update={"source_language": source, "target_languages": [target]})
        segments = self.segments(call, spec, body.text, sampling)
        pieces = [s for s in segments if s.translate]
        prompts = [self.encode(call, segment_prompt(spec, s.text, source, target, None), sampling, param="text")
                   for s in pieces]
        answers = await self.complete(call, prompts, sampling, body.seed)
        document = reassemble(segments, {s.index: texts[0] for s, (texts, _) in zip(pieces, answers)})
        reasons = {reasons[0] for _, reasons in answers}
        return api.TranslationResponse(
            id=f"translation-{uuid.uuid4().hex}", model=self.spec.model.name, source_language=source,
            target_language=target, text=document.text, segments=len(pieces),
            finish_reason="length" if "length" in reasons else "stop",
            usage=usage(sum(map(len, prompts)), call.tokens))

    # ---- request handling ---------------------------------------------------------------------------------------

    def start(self, route: str, model: str | None) -> Call:
        if self._pusher is None:
            self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())
        call = Call(route, self.metrics)
        if model is not None and model != self.spec.model.name:
            raise call.error(APIError(400, f"model {model!r} is not served here; use {self.spec.model.name!r} "
                                      "(GET /v1/models)", param="model", code="model_not_found"))
        return call

    def sampling(self, body: api.SamplingParams, max_tokens: int | None) -> SamplingSpec:
        default = self.spec.sampling
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        return default.model_copy(update={
            "temperature": default.temperature if body.temperature is None else body.temperature,
            "top_p": body.top_p or default.top_p,
            "max_tokens": max_tokens or default.max_tokens,
            "n": body.n,
            "stop": default.stop if stop is None else stop,
        })

    def language_codes(self, call: Call, source: str, target: str) -> tuple[str, str]:
        codes = []
        for field, name in (("source_language", source), ("target_language", target)):
            try:
                codes.append(languages.to_code(name))
            except languages.UnknownLanguage as err:
                raise call.error(APIError(400, str(err), param=field, code="invalid_parameter")) from None
        return codes[0], codes[1]

    def segments(self, call: Call, task: TranslateTask, text: str, sampling: SamplingSpec) -> list:
        """The text in pieces that fit the model beside their answer: the batch jobs' Markdown-aware segmenter."""
        tokenizer = self.engine.tokenizer

        def count(piece: str) -> int:
            return len(tokenizer.encode(piece, add_special_tokens=False))

        try:
            budget = segment_budget(task, self.spec.engine, sampling, tokenizer)
        except UserError as err:  # a small max_tokens still translates a text that small
            if count(text) > sampling.max_tokens:
                raise call.error(APIError(400, f"max_tokens {sampling.max_tokens} is too small to translate this "
                                          f"text in pieces ({err.problem})", param="max_tokens",
                                          code="invalid_parameter")) from None
            budget = sampling.max_tokens
        return segment_document(text, count, budget)

    def params(self, call: Call, sampling: SamplingSpec, seed: int | None):
        try:
            return self.engine.params(sampling, seed)
        except InvalidRequest as err:  # vLLM refuses this combination of parameters
            raise call.error(APIError(400, str(err), code="invalid_parameter")) from None

    def encode(self, call: Call, prompt: Prompt, sampling: SamplingSpec, param: str | None = None) -> list[int]:
        param = param or ("messages" if prompt.messages else "prompt")
        try:
            text = self.engine.render(prompt.messages, prompt.text)
        except (ValueError, TemplateError) as err:  # the model's chat template refuses these messages
            raise call.error(APIError(400, f"the model's chat template refuses these messages: {err}", param=param,
                                      code="invalid_messages")) from None
        try:
            return self.engine.encode(text, sampling.max_tokens)
        except PromptTooLong as err:
            raise call.error(APIError(400, str(err), param=param, code="context_length_exceeded")) from None

    def task_prompt(self, call: Call, name: str, row: dict, body: api.SamplingParams) -> Prompt:
        if body.n != 1:
            raise call.error(APIError(400, "task endpoints write one text; leave n out", param="n",
                                      code="invalid_parameter"))
        try:
            return self.tasks[name].prompt(row)
        except RowError as err:
            raise call.error(APIError(400, err.message, code=err.kind)) from None

    async def admit(self, call: Call) -> Slot:
        """Take a generation slot, or answer 429 at once when the replica's queue is full."""
        try:
            async with asyncio.timeout(call.remaining(self.spec.limits.request_timeout_s)):
                return await self.limiter.acquire()
        except Overloaded as err:
            raise call.error(APIError(429, f"server busy ({err}); retry shortly", kind="rate_limit_error",
                                      code="overloaded", retry_after=1)) from None
        except TimeoutError:
            raise call.error(APIError(504, "no generation slot freed up in time (limits.request_timeout_s)",
                                      kind="timeout", code="timeout")) from None
        except asyncio.CancelledError:  # the client left while waiting in the queue
            call.disconnected()
            raise

    async def deltas(self, call: Call, ids: list[int], params):
        """The engine's output for one prompt, within the request's time limit (the caller holds the slot)."""
        try:
            async with asyncio.timeout(call.remaining(self.spec.limits.request_timeout_s)):
                async with aclosing(self.engine.stream(ids, params, call.route)) as outputs:
                    async for completions in outputs:
                        call.generated(completions)
                        yield completions
        except TimeoutError:
            raise APIError(504, f"generation took longer than {self.spec.limits.request_timeout_s:g}s "
                           "(limits.request_timeout_s); ask for fewer max_tokens", kind="timeout",
                           code="timeout") from None

    async def collect(self, call: Call, ids: list[int], params, n: int) -> tuple[list[str], list[str | None]]:
        texts, reasons = [""] * n, [None] * n
        async for completions in self.deltas(call, ids, params):
            for c in completions:
                texts[c.index] += c.text
                reasons[c.index] = c.finish_reason or reasons[c.index]
        return texts, reasons

    async def complete(self, call: Call, prompts: list[list[int]], sampling: SamplingSpec, seed: int | None):
        """Whole answers to one or more prompts (the segments of one translation share the request's slot)."""
        params = self.params(call, sampling, seed)
        slot = await self.admit(call)
        try:
            async with asyncio.TaskGroup() as group:  # one failing prompt cancels its siblings
                tasks = [group.create_task(self.collect(call, ids, params, sampling.n)) for ids in prompts]
            answers = [task.result() for task in tasks]
        except asyncio.CancelledError:
            call.disconnected()
            raise
        except ExceptionGroup as failed:
            raise self.failure(call, failed.exceptions[0]) from None
        finally:
            slot.release()
        call.finish(200, prompt_tokens=sum(map(len, prompts)))
        return answers

    def failure(self, call: Call, err: Exception) -> APIError:
        """The error a failed generation answers with, counted in the metrics."""
        if not isinstance(err, APIError):
            if isinstance(err, InvalidRequest):
                err = APIError(400, str(err), code="invalid_parameter")
            else:  # the engine failed this request
                err = APIError(503, f"the engine failed: {err}", kind="service_unavailable", code="engine_error",
                               retry_after=5)
        return call.error(err)

    async def stream(self, call: Call, ids: list[int], sampling: SamplingSpec, seed: int | None, chunks,
                     include_usage: bool) -> StreamingResponse:
        params = self.params(call, sampling, seed)
        slot = await self.admit(call)  # before the headers, so a full server answers 429 rather than an event

        async def events():
            try:
                async with aclosing(self.deltas(call, ids, params)) as outputs:
                    async for completions in outputs:
                        yield sse(chunks.chunk(completions))
                if include_usage:
                    yield sse(chunks.usage(usage(len(ids), call.tokens)))
                call.finish(200, prompt_tokens=len(ids))
            except (asyncio.CancelledError, GeneratorExit):
                call.disconnected()
                raise
            except Exception as err:  # noqa: BLE001 - headers are sent: the error becomes the last event
                yield sse(self.failure(call, err).body())
            finally:
                slot.release()
            yield "data: [DONE]\n\n"

        body = events()
        weakref.finalize(body, slot.release)  # a stream dropped before its first chunk never runs its finally
        return StreamingResponse(body, media_type="text/event-stream")

    async def _push_metrics(self) -> None:
        while True:
            await asyncio.sleep(PUSH_INTERVAL_S)
            try:
                await self.hub.push.remote(self.replica, self.metrics.snapshot())
            except Exception:  # noqa: BLE001, S110 - the hub restarts with Serve; the next push catches up
                pass


def build_app(spec: ServeSpec):
    """The bound Serve application: the engine replicas plus one MetricsHub."""
    from genfarm.serve.deploy import server_options

    hub = serve.deployment(MetricsHub, name="MetricsHub", num_replicas=1, ray_actor_options={"num_cpus": 0}).bind()
    return GenfarmServer.options(**server_options(spec)).bind(spec.model_dump(mode="json"), hub)


def build(args: dict):
    """Entry point of Serve configs (import_path: genfarm.serve.app:build): `args` is a serve config mapping."""
    return build_app(ServeSpec.model_validate(args or {}))
