"""API keys: every path but health, metrics and the docs needs `Authorization: Bearer KEY` when keys are set."""

from __future__ import annotations

import hmac

from genfarm.serve.config import digest
from genfarm.serve.replica import ReplicaState, route_label
from genfarm.serve.responses import APIError, Call

OPEN_PATHS = {"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}


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
            # Exactly one Authorization header: the key checked here must be the key the request is owned by
            # (batches.owner_of), whichever of several headers a framework would pick.
            sent = [value for name, value in scope["headers"] if name.lower() == b"authorization"]
            scheme, _, key = (sent[0] if len(sent) == 1 else b"").decode("latin-1").partition(" ")
            presented = digest(key.strip())
            if scheme.lower() != "bearer" or not any(hmac.compare_digest(presented, k) for k in keys):
                error = APIError(401, "missing or invalid API key; send the header 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
                Call(route_label(scope["app"], scope["path"]), ReplicaState.metrics).error(error)
                return await error.response()(scope, receive, send)
        await self.inner(scope, receive, send)
