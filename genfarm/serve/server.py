"""One replica of the service: its vLLM async engine, admission, and how a request becomes generated text.

Ingress and engine share a replica on purpose: a request crosses the Serve proxy once and then goes straight into the
engine, with no second hop through a deployment handle per request and per streamed chunk (the added latency Ray Serve
LLM is known for). Serve's proxy spreads requests over replicas; scaling replicas scales engines. The routes
(genfarm/serve/routes.py) call the methods here.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from contextlib import aclosing

import psutil
from fastapi.responses import StreamingResponse
from ray import serve

from genfarm.engine import AsyncEngine, ChatTemplateRefused, Completion, InvalidRequest, PromptTooLong, use_gpu
from genfarm.rows import Prompt, RowError
from genfarm.serve import protocol as api
from genfarm.serve.config import ServeSpec, api_keys
from genfarm.serve.limits import Limiter, Overloaded, Slot
from genfarm.serve.metrics import ReplicaMetrics
from genfarm.serve.replica import ReplicaState
from genfarm.serve.responses import APIError, Call, sse, usage
from genfarm.spec import SamplingSpec
from genfarm.task import RowSampling, Task, make_task

PUSH_INTERVAL_S = 1.0  # how often a replica sends its counters to the MetricsHub


def direct_url() -> str | None:
    """This replica's own HTTP address when Ray Serve's direct ingress is on (throughput mode): the same API without
    the proxy hop, for a client that can pick its replica (no load balancing there)."""
    low = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000"))
    high = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", "31000"))
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and low <= conn.laddr.port <= high:
            return f"http://{conn.laddr.ip}:{conn.laddr.port}"
    return None


def online_tasks(spec: ServeSpec) -> dict[str, Task]:
    """The tasks a service answers, by name: online requests name task fields directly, so no column mapping."""
    tasks = {}
    for name, config in spec.tasks.items():
        if "columns" in type(config).model_fields:
            config = config.model_copy(update={"columns": {}})
        task = make_task(config)
        if task.route is not None:
            tasks[name] = task
    return tasks


class GenfarmServer:
    def __init__(self, config: dict, hub):
        import ray

        from genfarm import models

        self.spec = spec = ServeSpec.model_validate(config)
        gpu = use_gpu(spec.engine, len(ray.get_gpu_ids()))
        self.engine = AsyncEngine(models.resolve(spec.model.name, spec.model.revision), spec.engine, gpu)
        self.limiter = Limiter(spec.limits.concurrency(spec.engine, gpu), spec.limits.max_queued)
        self.metrics = ReplicaMetrics(lambda: self.limiter.running, lambda: self.limiter.waiting,
                                      self.engine.llm.get_num_unfinished_requests)
        ReplicaState.keys, ReplicaState.metrics, ReplicaState.server = api_keys(spec), self.metrics, self
        self.hub, self.replica = hub, serve.get_replica_context().replica_id.unique_id
        self.tasks = online_tasks(spec)
        self.token_chars = longest_token(self.engine.tokenizer)
        self._pusher: asyncio.Task | None = None

    async def check_health(self) -> None:
        """Serve's periodic health check: a replica whose engine died is replaced."""
        await self.engine.check_health()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()  # stop the engine-core process with the replica

    # ---- request handling ---------------------------------------------------------------------------------------

    def start(self, route: str, model: str | None) -> Call:
        if self._pusher is None:
            self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())
        call = Call(route, self.metrics)
        if model is not None and model != self.spec.model.name:
            raise call.error(APIError(404, f"model {model!r} is not served here; use {self.spec.model.name!r} "
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

    def params(self, call: Call, sampling: SamplingSpec, seed: int | None, extra: dict | None = None):
        """vLLM's sampling parameters; a request without a seed takes the serve config's (sampling.seed)."""
        try:
            return self.engine.params(sampling, self.spec.sampling.seed if seed is None else seed, extra)
        except InvalidRequest as err:  # vLLM refuses this combination of parameters
            raise call.error(APIError(400, str(err), code="invalid_parameter")) from None

    def encode(self, call: Call, prompt: Prompt, sampling: SamplingSpec, param: str | None = None) -> list[int]:
        param = param or ("messages" if prompt.messages else "prompt")
        try:
            text = self.engine.render(prompt.messages, prompt.text)
        except ChatTemplateRefused as err:
            raise call.error(APIError(400, str(err), param=param, code="invalid_messages")) from None
        most = self.spec.engine.max_model_len * self.token_chars  # characters any prompt that fits can have
        if len(text) > most:  # refused (or cut) by its length alone, without tokenizing megabytes
            if self.spec.engine.long_prompts == "error":
                raise call.error(APIError(400, f"prompt has {len(text)} characters, more than max_model_len "
                                          f"{self.spec.engine.max_model_len} tokens can hold", param=param,
                                          code="context_length_exceeded"))
            text = text[-most:]
        try:
            ids = self.engine.encode(text, sampling.max_tokens)
        except PromptTooLong as err:
            raise call.error(APIError(400, str(err), param=param, code="context_length_exceeded")) from None
        if not ids:
            raise call.error(APIError(400, "the prompt is empty", param=param, code="invalid_parameter"))
        return ids

    async def answer_task(self, name: str, body: api.SamplingParams):
        """A task route's answer: the task's own `respond`, with this replica lending it the engine."""
        task = self.tasks[name]
        call = self.start(task.route.path.rsplit("/", 1)[-1], body.model)
        if body.n != 1:
            raise call.error(APIError(400, "task endpoints write one text; leave n out", param="n",
                                      code="invalid_parameter"))
        row = body.model_dump(exclude_none=True, exclude=set(api.SamplingParams.model_fields) | {"model"})
        try:
            return await task.respond(row, TaskCall(self, call, self.sampling(body, body.max_tokens), body.seed))
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

    async def collect(self, call: Call, ids: list[int], params, n: int) -> list[Completion]:
        """The n whole completions of one prompt, from its streamed deltas (log-probabilities are cumulative)."""
        whole = [Completion("", None, 0, index) for index in range(n)]
        async for completions in self.deltas(call, ids, params):
            for c in completions:
                done = whole[c.index]
                done.text += c.text
                done.finish_reason = c.finish_reason or done.finish_reason
                done.completion_tokens += c.completion_tokens
                done.logprob = c.logprob if c.logprob is not None else done.logprob
        return whole

    async def complete(self, call: Call, prompts: list[list[int]], sampling: SamplingSpec, seed: int | None,
                       extra: dict | None = None) -> list[list[Completion]]:
        """Whole answers to one or more prompts (the segments of one translation share the request's slot);
        `extra`: further sampling parameters (a structured-output constraint)."""
        params = self.params(call, sampling, seed, extra)
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
                     include_usage: bool, extra: dict | None = None) -> StreamingResponse:
        params = self.params(call, sampling, seed, extra)
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


def longest_token(tokenizer) -> int:
    """The most characters of text one token can stand for, so that a text of more than max_model_len times that
    many characters cannot fit the model: the longest token of the vocabulary (a byte-level token is that many
    bytes), times 4 when the tokenizer normalizes text first (Unicode composition makes 3 characters into 1)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    shrinks = backend is None or backend.normalizer is not None
    return max(len(token) for token in tokens if token) * (4 if shrinks else 1)


class TaskCall:
    """What a task answering one request may use (genfarm.task.Online): this replica's engine, the request's
    sampling, and its errors as OpenAI-style 400s."""

    def __init__(self, server: GenfarmServer, call: Call, sampling: SamplingSpec, seed: int | None):
        self.server, self.call, self.sampling, self.seed = server, call, sampling, seed
        self.model = server.spec.model.name
        self.tokenizer = server.engine.tokenizer
        self.engine = server.spec.engine

    def encode(self, prompt: Prompt, param: str | None = None) -> list[int]:
        return self.server.encode(self.call, prompt, self.sampling, param)

    async def complete(self, prompts: list[list[int]], wanted: RowSampling | None = None) -> list[list[Completion]]:
        """Whole answers to the prompts, with the task's per-row sampling (a constraint, a token budget) if any."""
        sampling, seed, extra = self.sampling, self.seed, {}
        if wanted is not None:
            changes = {"max_tokens": wanted.max_tokens, "stop": list(wanted.stop) if wanted.stop else None,
                       "temperature": wanted.temperature, "top_p": wanted.top_p, "n": wanted.n}
            sampling = sampling.model_copy(update={k: v for k, v in changes.items() if v is not None})
            seed, extra = wanted.seed if wanted.seed is not None else seed, wanted.engine_extra()
        return await self.server.complete(self.call, prompts, sampling, seed, extra)

    def reject(self, message: str, param: str | None = None, code: str = "invalid_parameter") -> APIError:
        return self.call.error(APIError(400, message, param=param, code=code))

    def usage(self, prompts: list[list[int]]) -> dict:
        return usage(sum(map(len, prompts)), self.call.tokens)
