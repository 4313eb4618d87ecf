"""/v1/files and /v1/batches: OpenAI's batch API on the service. Files and batches live in `batches.storage`
(genfarm/serve/batch_store.py); a batch runs as a genfarm batch job on the service's Ray cluster, supervised by its
runner (genfarm/serve/batch_runner.py), never in a replica. Every object belongs to the API key that made it:
another key gets 404.

Each replica also looks after the batches every few seconds: a batch that is not finished and has no runner (the
service or its cluster was restarted) gets one, exactly once for the cluster, and /metrics counts batches by status.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse

from genfarm.serve import protocol as api
from genfarm.serve.batch_runner import ensure_runner, runner_alive
from genfarm.serve.batch_store import (
    CHUNK,
    ENDPOINTS,
    FINAL,
    STATUSES,
    Store,
    check_metadata,
    check_window,
    page,
    public,
)
from genfarm.serve.config import ServeSpec, digest
from genfarm.serve.metrics import batch_families
from genfarm.serve.replica import ReplicaState, current_server
from genfarm.serve.responses import APIError

WATCH_S = 5.0  # how often a replica looks after the batches (their runners, the metrics)
ERRORS_DOC = {code: {"model": api.ErrorBody} for code in (400, 401, 404, 429)}
log = logging.getLogger("genfarm.batches")


@asynccontextmanager
async def lifespan(app):
    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


router = APIRouter(lifespan=lifespan, responses=ERRORS_DOC, tags=["batch API"])
Server = Depends(current_server)
_stores: dict[str, Store] = {}
_finished: dict[str, dict] = {}  # records of finished batches: they never change again


class BatchRequest(api.Body):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


def store_of(spec: ServeSpec) -> Store:
    if spec.batches.storage is None:
        raise APIError(404, "the batch API is off on this service: set batches.storage in the serve config",
                       code="batches_disabled")
    if spec.batches.storage not in _stores:
        _stores[spec.batches.storage] = Store(spec.batches.storage)
    return _stores[spec.batches.storage]


def owner_of(request: Request) -> str:
    """The digest of the request's API key (the middleware checked it); "" on a service without keys."""
    if not ReplicaState.keys:
        return ""
    return digest(request.headers.get("authorization", "").partition(" ")[2].strip())


# --- files -------------------------------------------------------------------------------------------------------

@router.post("/v1/files", summary="Upload a batch input file (JSONL, purpose=batch)")
def upload_file(request: Request, file: UploadFile = File(...), purpose: str = Form(...), server=Server):
    if purpose != "batch":
        raise APIError(400, f"purpose {purpose!r} is not supported; genfarm keeps files for batches: use 'batch'",
                       param="purpose", code="invalid_parameter")
    store = store_of(server.spec)
    return public(store.add_upload(owner_of(request), file.filename or "batch.jsonl", file.file,
                                   server.spec.batches))


@router.get("/v1/files", summary="Your files, newest first")
def list_files(request: Request, purpose: str | None = None, after: str | None = None,
               limit: int = Query(10_000, ge=1, le=10_000), order: Literal["asc", "desc"] = "desc", server=Server):
    files = [public(f) for f in store_of(server.spec).files(owner_of(request))
             if purpose is None or f["purpose"] == purpose]
    return page(files if order == "desc" else files[::-1], after, limit)


@router.get("/v1/files/{file_id}", summary="One of your files")
def retrieve_file(file_id: str, request: Request, server=Server):
    return public(store_of(server.spec).file(file_id, owner_of(request)))


@router.get("/v1/files/{file_id}/content", summary="A file's bytes (a batch's output or error lines)")
def file_content(file_id: str, request: Request, server=Server):
    store = store_of(server.spec)
    record = store.file(file_id, owner_of(request))

    def chunks():
        with store.open_file(record) as stream:
            while chunk := stream.read(CHUNK):
                yield chunk

    return StreamingResponse(chunks(), media_type="application/jsonl")


@router.delete("/v1/files/{file_id}", summary="Delete one of your files")
def delete_file(file_id: str, request: Request, server=Server):
    store_of(server.spec).delete_file(file_id, owner_of(request))
    return {"id": file_id, "object": "file", "deleted": True}


# --- batches -----------------------------------------------------------------------------------------------------

@router.post("/v1/batches", summary="Run an uploaded file's requests as a batch job on the cluster")
def create_batch(body: BatchRequest, request: Request, server=Server):
    spec, store, owner = server.spec, store_of(server.spec), owner_of(request)
    limits = spec.batches
    try:
        source = store.file(body.input_file_id, owner)
    except APIError:
        raise APIError(400, f"no file {body.input_file_id} to run; upload one with purpose=batch first",
                       param="input_file_id", code="invalid_input_file") from None
    if source["purpose"] != "batch":
        raise APIError(400, f"{body.input_file_id} is a {source['purpose']} file, not a batch input file",
                       param="input_file_id", code="invalid_input_file")
    if body.endpoint not in ENDPOINTS:
        raise APIError(400, f"endpoint {body.endpoint!r} is not served here; use {' or '.join(ENDPOINTS)}",
                       param="endpoint", code="invalid_parameter")
    window = check_window(body.completion_window)
    check_metadata(body.metadata)
    running = [b for b in store.batches() if b["status"] not in FINAL]
    if sum(b["_owner"] == owner for b in running) >= limits.max_batches_per_key:
        raise APIError(429, f"this key has {limits.max_batches_per_key} unfinished batches "
                       "(batches.max_batches_per_key); wait for one to finish", kind="rate_limit_error",
                       code="batch_quota_exceeded", retry_after=60)
    if len(running) >= limits.max_concurrent:
        raise APIError(429, f"the service runs {limits.max_concurrent} batches already (batches.max_concurrent); "
                       "retry later", kind="rate_limit_error", code="too_many_batches", retry_after=60)
    now = int(time.time())
    batch_id = f"batch_{uuid.uuid4().hex[:24]}"
    record = {
        "id": batch_id, "object": "batch", "endpoint": body.endpoint, "errors": None,
        "input_file_id": body.input_file_id, "completion_window": body.completion_window, "status": "validating",
        "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
        "expires_at": now + window, "finalizing_at": None, "completed_at": None, "failed_at": None,
        "expired_at": None, "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": source["_lines"], "completed": 0, "failed": 0},
        "metadata": body.metadata, "model": spec.model.name, "usage": None,
        "_owner": owner, "_job": batch_job(spec, store, batch_id, source),
    }
    store.save_batch(record)
    ensure_runner(store.uri, batch_id)
    return store.view(record)


def batch_job(spec: ServeSpec, store: Store, batch_id: str, source: dict) -> dict:
    """The genfarm job spec of a batch: the service's model, engine and sampling defaults, its own output folder."""
    return {
        "plugins": spec.plugins, "name": batch_id,
        "input": {"path": store.uri_of(source["_path"]), "format": "openai-batch"},
        "task": {"type": "openai", "models": [spec.model.name]},
        "model": spec.model.model_dump(mode="json"), "engine": spec.engine.model_dump(mode="json"),
        "sampling": spec.sampling.model_dump(mode="json"),
        "workers": {"count": spec.batches.workers, "batch_size": spec.batches.batch_size},
        "output": {"path": store.job_output(batch_id)},
    }


@router.get("/v1/batches/{batch_id}", summary="One of your batches, with its request counts so far")
def retrieve_batch(batch_id: str, request: Request, server=Server):
    store = store_of(server.spec)
    return store.view(store.batch(batch_id, owner_of(request)))


@router.get("/v1/batches", summary="Your batches, newest first")
def list_batches(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                 server=Server):
    store = store_of(server.spec)
    return page([store.view(b) for b in store.batches(owner_of(request))], after, limit)


@router.post("/v1/batches/{batch_id}/cancel", summary="Cancel a batch; what finished stays in its files")
def cancel_batch(batch_id: str, request: Request, server=Server):
    store = store_of(server.spec)
    record = store.batch(batch_id, owner_of(request))
    if record["status"] in FINAL:
        raise APIError(400, f"batch {batch_id} is {record['status']} already; there is nothing to cancel",
                       param="batch_id", code="invalid_batch_status")
    store.request_cancel(batch_id)
    return store.view(record)


# --- looking after the batches -----------------------------------------------------------------------------------

async def watch() -> None:
    """Every WATCH_S: start the runner of every unfinished batch that has none, and report the counts."""
    while True:
        await asyncio.sleep(WATCH_S)
        server = ReplicaState.server
        if server is None or server.spec.batches.storage is None:
            continue
        try:
            families = await asyncio.to_thread(look_after, store_of(server.spec))
            await server.hub.push.remote("batches", families)
        except Exception:  # noqa: BLE001 - storage or Ray hiccups: the next round tries again
            log.exception("looking after the batches failed")


def look_after(store: Store) -> list:
    by_status = dict.fromkeys(STATUSES, 0)
    tokens = {"prompt": 0, "completion": 0}
    for name in store.batch_ids():
        record = _finished.get(name)
        if record is None:
            try:
                record = store.batch(name)
            except APIError:
                continue
            if record["status"] in FINAL:
                _finished[name] = record
            elif not runner_alive(name):
                ensure_runner(store.uri, name)
        cancelling = record["status"] not in FINAL and store.cancel_requested(name) is not None
        by_status["cancelling" if cancelling else record["status"]] += 1
        usage = record.get("usage") or {}
        tokens["prompt"] += usage.get("input_tokens", 0)
        tokens["completion"] += usage.get("output_tokens", 0)
    return batch_families(by_status, tokens)
