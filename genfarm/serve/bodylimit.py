"""The request body limit (limits.max_body_bytes): a body over it is refused with 413 before anything parses it.

Uploads (POST /v1/files) are held to their own limit instead (batches.max_file_bytes and room for the form around the
file): a batch input file may be far larger than any one request. A declared Content-Length over it is refused
unread; a chunked upload is held to batches.max_file_bytes by the upload route as it reads the file."""

from __future__ import annotations

from genfarm.serve.replica import ReplicaState, route_label
from genfarm.serve.responses import APIError, Call


class BodyLimit:
    """Plain ASGI middleware (like RequireApiKey, so streamed answers pass untouched): a declared Content-Length over
    the limit is refused at once, unread; a body without one (chunked) is read up to the limit and refused when it
    passes it. A body within the limit is handed on whole, then the connection's later messages (a disconnect)."""

    UPLOADS = "/v1/files"
    FORM_BYTES = 1 << 20  # room for the multipart form around the file: boundaries, the purpose field

    def __init__(self, inner, max_bytes: int, max_upload_bytes: int | None = None):
        self.inner, self.max_bytes, self.max_upload_bytes = inner, max_bytes, max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if scope["path"] == self.UPLOADS:  # parsed into a spooled file before the route runs: refuse what is too big
            limit = None if self.max_upload_bytes is None else self.max_upload_bytes + self.FORM_BYTES
            if declared is not None and (not declared.isdigit() or (limit is not None and int(declared) > limit)):
                return await self.refuse(scope, receive, send, declared, limit)
            return await self.inner(scope, receive, send)
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self.refuse(scope, receive, send, declared)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return await self.inner(scope, replay([message], receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self.refuse(scope, receive, send, None)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.inner(scope, replay([body], receive), send)

    async def refuse(self, scope, receive, send, declared: bytes | None, upload_limit: int | None = None) -> None:
        if declared is not None and not declared.isdigit():
            error = APIError(400, f"Content-Length {declared.decode('latin-1')!r} is not a number of bytes",
                             code="invalid_request")
        elif upload_limit is not None:
            error = APIError(413, f"the upload is larger than batches.max_file_bytes ({self.max_upload_bytes} bytes) "
                             "allows; split the batch input file", code="request_too_large")
        else:
            error = APIError(413, f"the request body is larger than {self.max_bytes} bytes (limits.max_body_bytes); "
                             "send a shorter prompt or text", code="request_too_large")
        if ReplicaState.metrics is not None:
            Call(route_label(scope["app"], scope["path"]), ReplicaState.metrics).error(error)
        await error.response()(scope, receive, send)


def replay(messages: list[dict], receive):
    """An ASGI receive that gives `messages` first, then whatever the connection sends next."""
    pending = list(messages)

    async def next_message() -> dict:
        return pending.pop(0) if pending else await receive()

    return next_message
