"""Files and batches of the OpenAI batch API, kept in the serve config's `batches.storage` (a folder or an object-store
URI), so every replica sees them and they outlive the service.

    STORAGE/files/FILE_ID.json        a file's record (OpenAI's file object, plus its owner and where its bytes are)
    STORAGE/files/FILE_ID.jsonl       an uploaded file's bytes
    STORAGE/batches/BATCH_ID/batch.json   a batch's record (OpenAI's batch object, plus its owner and its job spec)
    STORAGE/batches/BATCH_ID/cancel       there once a cancel was asked for (by the API or `genfarm batches cancel`)
    STORAGE/batches/BATCH_ID/job/         the batch's genfarm job: its ledger, and _openai/{output,errors}.jsonl

A batch's record is written when it is created and afterwards only by its runner (genfarm/serve/batch_runner.py), so
there is one writer; a cancel is a file of its own that the runner reads. Every write is atomic (storage.atomic_path).
Records carry their owner, the sha256 digest of the API key that made them ("" on a service without keys), in
fields starting with '_', which answers leave out.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator

import pyarrow.fs as pafs

from genfarm.batch.openai_files import request_counts
from genfarm.serve.config import BatchesSpec
from genfarm.serve.responses import APIError
from genfarm.storage import atomic_path, is_local, open_fs, write_text

FILES, BATCHES, JOB = "files", "batches", "job"
FINAL = ("completed", "failed", "cancelled", "expired")
STATUSES = ("validating", "in_progress", "finalizing", "cancelling", *FINAL)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
WINDOW = re.compile(r"^([1-9][0-9]{0,2})h$")  # completion_window: hours, e.g. 24h
MAX_WINDOW_H = 720
CHUNK = 1 << 20


def not_found(kind: str, object_id: str) -> APIError:
    return APIError(404, f"No such {kind}: {object_id}", param=f"{kind}_id", code="not_found")


def public(record: dict) -> dict:
    return {key: value for key, value in record.items() if not key.startswith("_")}


class Store:
    def __init__(self, uri: str):
        self.fs, self.root = open_fs(uri)
        self.uri = uri.rstrip("/") if not is_local(self.fs) else self.root  # what a job's spec names
        self.tmp = self.path("_tmp")

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def uri_of(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    def write_json(self, path: str, data: dict) -> None:
        write_text(self.fs, path, json.dumps(data, indent=1), self.tmp)

    def read_json(self, path: str) -> dict | None:
        try:
            with self.fs.open_input_stream(path) as stream:
                return json.loads(stream.read())
        except (FileNotFoundError, OSError, ValueError):
            return None

    def _names(self, *folder: str) -> list[str]:
        selector = pafs.FileSelector(self.path(*folder), allow_not_found=True)
        return [info.base_name for info in self.fs.get_file_info(selector)]

    # --- files ----------------------------------------------------------------------------------------------
    def add_upload(self, owner: str, filename: str, stream, limits: BatchesSpec) -> dict:
        """Store an uploaded batch input file, checking it line by line on the way (size, JSON objects, a unique
        custom_id each, number of lines); a file that fails is a 400 naming the line, and nothing is kept."""
        stored = sum(f["bytes"] for f in self.files(owner) if f["purpose"] == "batch")
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        content = self.path(FILES, f"{file_id}.jsonl")
        checker = LineChecker(limits)
        with atomic_path(self.fs, content, self.tmp) as path, self.fs.open_output_stream(path) as out:
            while chunk := stream.read(CHUNK):
                checker.feed(chunk)
                if stored + checker.bytes > limits.max_stored_bytes_per_key:
                    raise APIError(429, f"this key's files would take more than batches.max_stored_bytes_per_key "
                                   f"({limits.max_stored_bytes_per_key} bytes); delete files it no longer needs",
                                   kind="insufficient_quota", code="file_storage_quota_exceeded")
                out.write(chunk)
            checker.end()
        record = {"id": file_id, "object": "file", "bytes": checker.bytes, "created_at": int(time.time()),
                  "filename": filename, "purpose": "batch", "status": "processed", "expires_at": None,
                  "status_details": None, "_owner": owner, "_path": f"{FILES}/{file_id}.jsonl",
                  "_lines": checker.lines}
        self.write_json(self.path(FILES, f"{file_id}.json"), record)
        return record

    def add_output(self, owner: str, filename: str, relpath: str, lines: int) -> dict:
        """A file record for one of a batch's result files (its bytes stay in the batch's job folder)."""
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        record = {"id": file_id, "object": "file", "bytes": self.fs.get_file_info(self.path(relpath)).size,
                  "created_at": int(time.time()), "filename": filename, "purpose": "batch_output",
                  "status": "processed", "expires_at": None, "status_details": None, "_owner": owner,
                  "_path": relpath, "_lines": lines}
        self.write_json(self.path(FILES, f"{file_id}.json"), record)
        return record

    def file(self, file_id: str, owner: str) -> dict:
        record = self.read_json(self.path(FILES, f"{file_id}.json")) if _safe(file_id) else None
        if record is None or record["_owner"] != owner:  # another key's file is no file at all
            raise not_found("file", file_id)
        return record

    def files(self, owner: str | None) -> list[dict]:
        """Every file of an owner (None: of every owner), newest first."""
        records = (self.read_json(self.path(FILES, name)) for name in self._names(FILES) if name.endswith(".json"))
        return _newest_first(r for r in records if r is not None and (owner is None or r["_owner"] == owner))

    def open_file(self, record: dict):
        return self.fs.open_input_stream(self.path(record["_path"]))

    def delete_file(self, file_id: str, owner: str) -> None:
        record = self.file(file_id, owner)
        using = [b["id"] for b in self.batches(owner) if b["input_file_id"] == file_id and b["status"] not in FINAL]
        if using:
            raise APIError(400, f"{file_id} is the input of unfinished batch {using[0]}; cancel it first",
                           param="file_id", code="file_in_use")
        self.fs.delete_file(self.path(FILES, f"{file_id}.json"))
        if record["_path"].startswith(f"{FILES}/"):  # an upload's bytes; a result file's stay with its batch
            self.fs.delete_file(self.path(record["_path"]))

    # --- batches --------------------------------------------------------------------------------------------
    def save_batch(self, record: dict) -> None:
        self.write_json(self.path(BATCHES, record["id"], "batch.json"), record)

    def batch(self, batch_id: str, owner: str | None = None) -> dict:
        """A batch's record (an owner's own only, unless owner is None)."""
        record = self.read_json(self.path(BATCHES, batch_id, "batch.json")) if _safe(batch_id) else None
        if record is None or (owner is not None and record["_owner"] != owner):
            raise not_found("batch", batch_id)
        return record

    def batches(self, owner: str | None = None) -> list[dict]:
        records = (self.read_json(self.path(BATCHES, name, "batch.json")) for name in self.batch_ids())
        return _newest_first(r for r in records if r is not None and (owner is None or r["_owner"] == owner))

    def batch_ids(self) -> list[str]:
        return self._names(BATCHES)

    def job_output(self, batch_id: str) -> str:
        """The URI of the batch's genfarm job folder (its ledger)."""
        return self.uri_of(BATCHES, batch_id, JOB)

    def request_cancel(self, batch_id: str) -> None:
        write_text(self.fs, self.path(BATCHES, batch_id, "cancel"), str(int(time.time())), self.tmp)

    def cancel_requested(self, batch_id: str) -> int | None:
        """When a cancel was asked for, if one was."""
        try:
            with self.fs.open_input_stream(self.path(BATCHES, batch_id, "cancel")) as stream:
                return int(stream.read())
        except (FileNotFoundError, OSError, ValueError):
            return None

    def view(self, record: dict) -> dict:
        """A batch as the API answers it: while it runs, with a pending cancel and its request counts so far."""
        answer = public(record)
        if answer["status"] in FINAL:
            return answer
        cancelled = self.cancel_requested(record["id"])
        if cancelled is not None:
            answer.update(status="cancelling", cancelling_at=answer.get("cancelling_at") or cancelled)
        if answer["status"] != "validating":
            completed, failed = request_counts(self.job_output(record["id"]))
            answer["request_counts"] = {**answer["request_counts"], "completed": completed, "failed": failed}
        return answer


class LineChecker:
    """Checks an upload as it streams by: each line a JSON object with a unique text custom_id; size and lines
    within the limits. Whatever else a request gets wrong is the batch's to report, line by line."""

    def __init__(self, limits: BatchesSpec):
        self.limits = limits
        self.bytes = self.lines = self.number = 0
        self.pending = b""
        self.seen: set[str] = set()

    def feed(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        if self.bytes > self.limits.max_file_bytes:
            raise upload_error(f"the file is larger than batches.max_file_bytes ({self.limits.max_file_bytes} "
                               "bytes); split it into several batches", "file_too_large")
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        for line in lines:
            self.line(line)

    def end(self) -> None:
        self.line(self.pending)
        if not self.lines:
            raise upload_error("the file holds no requests", "empty_file")

    def line(self, raw: bytes) -> None:
        self.number += 1
        if not raw.strip():
            return
        where = f"line {self.number}"
        try:
            request = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise upload_error(f"{where} is not UTF-8 text", "invalid_file") from None
        except json.JSONDecodeError as err:
            raise upload_error(f"{where} is not JSON ({err.msg}); each line is one request object",
                               "invalid_json_line") from None
        if not isinstance(request, dict):
            raise upload_error(f"{where} is not a JSON object", "invalid_json_line")
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise upload_error(f"{where} has no custom_id (a non-empty string)", "missing_custom_id")
        if custom_id in self.seen:
            raise upload_error(f"{where}: custom_id {custom_id!r} appears twice; each request needs its own",
                               "duplicate_custom_id")
        self.seen.add(custom_id)
        self.lines += 1
        if self.lines > self.limits.max_file_lines:
            raise upload_error(f"the file has more than batches.max_file_lines ({self.limits.max_file_lines}) "
                               "requests; split it into several batches", "too_many_lines")


def upload_error(message: str, code: str) -> APIError:
    return APIError(400, message, param="file", code=code)


def check_window(window: str) -> int:
    """completion_window in seconds; it sets expires_at (it is no price tier here)."""
    match = WINDOW.match(window)
    if not match or int(match.group(1)) > MAX_WINDOW_H:
        raise APIError(400, f"completion_window {window!r} is not a number of hours up to {MAX_WINDOW_H}h, "
                       "e.g. 24h", param="completion_window", code="invalid_parameter")
    return int(match.group(1)) * 3600


def check_metadata(metadata: dict | None) -> None:
    if metadata is None:
        return
    if len(metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
        raise APIError(400, "metadata holds at most 16 pairs, keys up to 64 and values up to 512 characters",
                       param="metadata", code="invalid_parameter")


def _safe(object_id: str) -> bool:
    """An id that can only name an object of ours (no path tricks)."""
    return bool(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", object_id))


def _newest_first(records: Iterator[dict]) -> list[dict]:
    return sorted(records, key=lambda r: (-r["created_at"], r["id"]))


def page(records: list[dict], after: str | None, limit: int) -> dict:
    """OpenAI's cursor page: the `limit` records after the one with id `after` (one this list does not hold is the
    client's mistake: starting over would hand it the first page again)."""
    start = next((i + 1 for i, r in enumerate(records) if r["id"] == after), None) if after else 0
    if start is None:
        raise APIError(400, f"{after!r} is not in this list; pass the last_id of the page before",
                       param="after", code="invalid_parameter")
    data = records[start:start + limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": start + limit < len(records)}
