"""The serve config: which model and engine settings, how many replicas, limits and API keys.

The model, engine and sampling sections are the same specs batch job files use, so a service and a job that name
the same settings run the same engine.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import ClassVar

from pydantic import Field, ValidationError, field_validator, model_validator

from genfarm.engine.settings import online_max_num_seqs
from genfarm.spec import (
    EngineSpec,
    ModelSpec,
    SamplingSpec,
    ScaleRange,
    Spec,
    TaskSection,
    apply_overrides,
    load_plugins,
    load_spec,
    validate,
)
from genfarm.task import task_classes

API_KEYS_ENV = "GENFARM_API_KEYS"
HASH_PREFIX = "sha256:"


class ReplicasSpec(ScaleRange):
    section: ClassVar[str] = "replicas"
    target_ongoing_requests: float = Field(
        16, gt=0, description="Autoscaling aims at this many requests per replica (with min/max)."
    )


class LimitsSpec(Spec):
    max_concurrent: int | None = Field(
        None, ge=1, description="Requests a replica generates at once; default: engine.max_num_seqs."
    )
    max_queued: int = Field(64, ge=0, description="Requests a replica keeps waiting beyond that; more get 429.")
    request_timeout_s: float = Field(300, gt=0, description="A request (queueing + generation) ends after this.")
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="Largest request body; a larger one gets 413 before "
                                "it is read (default 4 MiB).")

    def concurrency(self, engine: EngineSpec, gpu: bool | None = None) -> int:
        """max_concurrent, or the sequences the engine decodes at once on its device (`gpu` None: a GPU engine
        only if engine.device says gpu)."""
        return self.max_concurrent or online_max_num_seqs(engine, engine.device == "gpu" if gpu is None else gpu)


class HttpSpec(Spec):
    host: str = Field("127.0.0.1", description="Address the HTTP proxy listens on (0.0.0.0 for every interface).")
    port: int = Field(8000, ge=1, le=65535)


class BatchesSpec(Spec):
    """/v1/files and /v1/batches: where their files and state live, and their limits."""

    storage: str | None = Field(
        None, description="Folder or object-store URI (s3://...) of uploaded files, batches and their results, "
        "reachable from every node; unset: the batch API answers 404.")
    max_file_bytes: int = Field(200 * 2**20, ge=1, description="Largest batch input file an upload may send.")
    max_file_lines: int = Field(50_000, ge=1, description="Most requests in one batch input file.")
    max_concurrent: int = Field(2, ge=1, description="Unfinished batches on the service; more are refused (429).")
    max_batches_per_key: int = Field(2, ge=1, description="Unfinished batches one API key may have (429 beyond).")
    max_stored_bytes_per_key: int = Field(10 * 2**30, ge=1, description="Bytes of uploads one API key may keep.")
    workers: int = Field(1, ge=1, description="Engine actors of each batch job, beside the service's replicas.")
    batch_size: int = Field(64, ge=1, description="Requests a batch engine takes at once (a committed part).")


def task_defaults(configured: object) -> object:
    """The serve config's `tasks`: every task with an HTTP route that needs no settings (or is configured here),
    at its defaults, with the config's sections over them. There the section names the task, so `type:` may be
    left out. A task that needs settings (an extraction's schema, say) is served once the config gives them."""
    if not isinstance(configured, dict):
        return configured
    tasks = {name: {"type": name} for name, task in task_classes().items()
             if task.route is not None and usable_at_defaults(task.Config, name)}
    for name, section in configured.items():
        tasks[name] = {"type": name, **section} if isinstance(section, dict) else section
    return tasks


def usable_at_defaults(config: type, name: str) -> bool:
    try:
        config.model_validate({"type": name})
    except ValidationError:
        return False
    return True


class ServeSpec(Spec):
    plugins: list[str] = Field(default_factory=list, description="Python modules that add tasks (importable on "
                               "every node); their routes are served too.")
    name: str = Field("genfarm", description="Ray Serve application name.")
    model: ModelSpec = ModelSpec()
    engine: EngineSpec = EngineSpec()
    sampling: SamplingSpec = Field(
        SamplingSpec(max_tokens=256, seed=None),
        description="Defaults for requests that leave a parameter out.",
    )
    replicas: ReplicasSpec = ReplicasSpec()
    limits: LimitsSpec = LimitsSpec()
    http: HttpSpec = HttpSpec()
    api_keys: list[str] = Field(
        default_factory=list, description=f"Accepted API keys (also ${API_KEYS_ENV}, comma-separated); none: open."
    )
    batches: BatchesSpec = BatchesSpec()
    tasks: dict[str, TaskSection] = Field(
        default_factory=dict, validate_default=True,
        description="Defaults of the task endpoints (/v1/articles, /v1/translations, ...); requests may override "
        "the fields.")

    @field_validator("plugins")
    @classmethod
    def _import_plugins(cls, modules: list[str]) -> list[str]:
        return load_plugins(modules)

    @field_validator("tasks", mode="before")
    @classmethod
    def _with_defaults(cls, configured: object) -> object:
        return task_defaults(configured)

    @model_validator(mode="after")
    def _usable_keys(self) -> ServeSpec:
        if any(not key.strip() or key != key.strip() or not key.isascii() for key in self.api_keys):
            raise ValueError("api_keys: every key must be non-empty ASCII without surrounding spaces")
        return self


def load_serve_config(path: str | Path | None, overrides: list[str] = ()) -> ServeSpec:
    """The serve config from a YAML file (or the defaults), with --set overrides."""
    if path is None:
        return validate(ServeSpec, apply_overrides({}, list(overrides)), source="--set")
    return load_spec(ServeSpec, path, overrides, "serve config", example="examples/serve.yaml")


def api_keys(spec: ServeSpec) -> frozenset[str]:
    """Keys from the config plus $GENFARM_API_KEYS, each as `sha256:HEX`; an empty set means no authentication."""
    from_env = os.environ.get(API_KEYS_ENV, "").split(",")
    return frozenset(hashed(key.strip()) for key in [*spec.api_keys, *from_env] if key.strip())


def hashed(key: str) -> str:
    """A configured key as `sha256:HEX` (kept if it already is one), so Serve's dashboard never shows a key."""
    return key if key.startswith(HASH_PREFIX) else digest(key)


def digest(key: str) -> str:
    """`sha256:HEX` of a key a client presented: always hashed, so a leaked digest is no key."""
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()
