"""What the module-level parts of the app (middleware, error handlers, routes) need from this process's replica.

A class, because Serve ships the FastAPI app to replicas as a copy while importable classes stay shared with the
module: the replica fills it in when it starts.
"""

from __future__ import annotations

from typing import Any


class ReplicaState:
    keys: frozenset[str] = frozenset()  # sha256:HEX digests
    metrics: Any = None  # genfarm.serve.metrics.ReplicaMetrics
    server: Any = None  # genfarm.serve.server.GenfarmServer


def current_server():
    """FastAPI dependency: the replica answering this request."""
    return ReplicaState.server


def route_label(app, path: str) -> str:
    """The metrics label of a path: the app's own name for a route it serves, else 'other'."""
    return app.state.route_labels.get(path, "other")
