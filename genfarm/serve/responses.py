"""What requests end with: OpenAI-style errors, streamed chunks, usage counts, and each call's metrics."""

from __future__ import annotations

import json
import time

from fastapi.responses import JSONResponse

from genfarm.engine import Completion
from genfarm.serve.metrics import ReplicaMetrics


class APIError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class Call:
    """One request's bookkeeping: timing, tokens, and the metrics it ends with."""

    def __init__(self, route: str, metrics: ReplicaMetrics):
        self.route, self.metrics = route, metrics
        self.started = time.monotonic()
        self.first_token: float | None = None
        self.tokens = 0
        self.done = False

    def remaining(self, limit: float) -> float:
        return max(0.0, self.started + limit - time.monotonic())

    def generated(self, completions: list[Completion]) -> None:
        if self.first_token is None:
            self.first_token = time.monotonic()
            self.metrics.ttft.labels(self.route).observe(self.first_token - self.started)
        self.tokens += sum(c.completion_tokens for c in completions)

    def finish(self, status: int, prompt_tokens: int = 0, error: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        m, route = self.metrics, self.route
        m.requests.labels(route, str(status)).inc()
        m.latency.labels(route).observe(time.monotonic() - self.started)
        m.prompt_tokens.labels(route).inc(prompt_tokens)
        m.completion_tokens.labels(route).inc(self.tokens)
        if error is not None:
            m.errors.labels(route, error).inc()

    def error(self, err: APIError) -> APIError:
        self.finish(err.status, error=err.code or err.kind)
        return err

    def disconnected(self) -> None:
        self.metrics.disconnects.labels(self.route).inc()
        self.finish(499, error="client_disconnected")  # nginx's code for a client that closed the connection


class ChatChunks:
    """Streamed chat.completion.chunk events; a choice's first delta carries the assistant role."""

    def __init__(self, rid: str, model: str):
        self.head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        self.started: set[int] = set()

    def chunk(self, completions: list[Completion]) -> dict:
        choices = []
        for c in completions:
            delta = {"content": c.text}
            if c.index not in self.started:
                self.started.add(c.index)
                delta["role"] = "assistant"
            choices.append({"index": c.index, "delta": delta, "finish_reason": c.finish_reason, "logprobs": None})
        return {**self.head, "choices": choices}

    def usage(self, counts: dict) -> dict:
        return {**self.head, "choices": [], "usage": counts}


class TextChunks:
    """Streamed text_completion events; with echo, each choice starts with the prompt."""

    def __init__(self, rid: str, model: str, echo: str):
        self.head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
        self.echo, self.started = echo, set()

    def chunk(self, completions: list[Completion]) -> dict:
        choices = []
        for c in completions:
            text = c.text
            if c.index not in self.started:
                self.started.add(c.index)
                text = self.echo + text
            choices.append({"index": c.index, "text": text, "finish_reason": c.finish_reason, "logprobs": None})
        return {**self.head, "choices": choices}

    def usage(self, counts: dict) -> dict:
        return {**self.head, "choices": [], "usage": counts}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
