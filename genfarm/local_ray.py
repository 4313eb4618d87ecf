"""The settings of a Ray that genfarm starts for itself on this machine (a local job or a local service).

Ray runs workers at nice 15 so its daemons stay responsive; here the engine is the work, and at nice 15 it lost the
CPU to every other process (a load client, Ray's daemons, a neighbour). Operators of `ray start` clusters can export
the same settings.
"""

from __future__ import annotations

import os

LOCAL_RAY_ENV = {"RAY_worker_niceness": "0"}


def use_local_ray_env(extra: dict[str, str] | None = None) -> None:
    """Put LOCAL_RAY_ENV (and `extra`) in this process's env for the Ray it is about to start; what the user set
    wins."""
    for name, value in {**LOCAL_RAY_ENV, **(extra or {})}.items():
        os.environ.setdefault(name, value)
