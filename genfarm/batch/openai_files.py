"""OpenAI's batch output and error files, beside the Parquet parts of a job whose rows are OpenAI API requests
(input.format openai-batch; the `openai` task).

A sink writes every committed part also as OpenAI's JSONL lines, under the part's name, before the Parquet record:
OUTPUT/_openai/output/NAME.jsonl for results, OUTPUT/_openai/errors/NAME.jsonl for error rows, so a retried batch
rewrites its lines instead of adding a second copy. `collect` joins the lines of every committed part into
OUTPUT/_openai/output.jsonl and OUTPUT/_openai/errors.jsonl (under '_', so pandas.read_parquet(OUTPUT) still reads
the Parquet results alone), and can add an error line for each request that never ran (a cancelled or expired batch).

A line: {"id", "custom_id", "response": {"status_code", "request_id", "body"} | null, "error": {"code", "message"}
| null}. A result's body is what the online API answers (chat.completion, text_completion, with usage); a request the
API would refuse gets its 400 and error body; a line that is no request at all (bad JSON, no custom_id, an unknown
url) gets `error` instead, as OpenAI's own files do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from genfarm.batch.ledger import Ledger
from genfarm.batch.source import list_inputs, source_rows
from genfarm.spec import InputSpec
from genfarm.storage import atomic_path

FOLDER = "_openai"
OUTPUT_FILE, ERROR_FILE = "output.jsonl", "errors.jsonl"
ENDPOINTS = {"/v1/chat/completions": ("chat.completion", "chatcmpl"), "/v1/completions": ("text_completion", "cmpl")}
# Error rows that are no request at all: an `error` object, no response.
LINE_ERRORS = {"bad_json": "invalid_json_line", "missing_field": "missing_custom_id",
               "duplicate_id": "duplicate_custom_id", "bad_type": "invalid_request"}
NOT_A_REQUEST = {"invalid_url", "invalid_method"}  # invalid_request codes of a line that names no API request
# Error rows of a request that ran and failed: (status, error type, code), as the online API answers them.
RESPONSE_ERRORS = {"prompt_too_long": (400, "invalid_request_error", "context_length_exceeded"),
                   "chat_template": (400, "invalid_request_error", "invalid_messages"),
                   "timeout": (504, "timeout", "timeout"), "engine_error": (500, "server_error", "engine_error")}
REQUEST_ERROR = re.compile(r"^(\w+)(?: \(([^)]*)\))?: (.*)$", re.S)


def request_error(code: str, message: str, param: str | None = None) -> str:
    """The message of an `invalid_request` error row: the online API's error code, parameter and message."""
    return f"{code}{f' ({param})' if param else ''}: {message}"


def parse_request_error(text: str) -> tuple[str, str | None, str]:
    """(code, param, message) of an `invalid_request` error row's message."""
    match = REQUEST_ERROR.match(text)
    return (match.group(1), match.group(2), match.group(3)) if match else ("invalid_request", None, text)


def _ids(job_id: str, custom_id: str | None, row_id: str) -> str:
    """A stable hex id for a request's line: a rewritten part repeats its lines exactly."""
    return hashlib.sha256(f"{job_id}\n{custom_id or row_id}".encode()).hexdigest()[:24]


def _line(key: str, custom_id: str | None, response: dict | None = None, error: dict | None = None) -> dict:
    return {"id": f"batch_req_{key}", "custom_id": custom_id,
            "response": None if response is None else {**response, "request_id": f"req_{key}"}, "error": error}


def output_lines(rows: list[dict]) -> list[dict]:
    """One output line per request (its samples as choices) from result rows."""
    by_id: dict[str, list[dict]] = {}
    for row in rows:
        by_id.setdefault(row["id"], []).append(row)
    return [result_line(sorted(samples, key=lambda r: r["sample_index"])) for samples in by_id.values()]


def result_line(samples: list[dict]) -> dict:
    first = samples[0]
    key = _ids(first["job_id"], first["id"], first["id"])
    kind, prefix = ENDPOINTS[first["url"]]
    if kind == "chat.completion":
        choices = [{"index": s["sample_index"], "message": {"role": "assistant", "content": s["output_text"]},
                    "finish_reason": s["finish_reason"], "logprobs": None} for s in samples]
    else:
        request = json.loads(first["body"])
        prompt = request["prompt"] if isinstance(request["prompt"], str) else request["prompt"][0]
        echo = prompt if request.get("echo") else ""
        choices = [{"index": s["sample_index"], "text": echo + s["output_text"], "finish_reason": s["finish_reason"],
                    "logprobs": None} for s in samples]
    completion_tokens = sum(s["completion_tokens"] for s in samples)
    body = {"id": f"{prefix}-{key}", "object": kind, "created": int(first["finished_at"].timestamp()),
            "model": first["model"], "choices": choices,
            "usage": {"prompt_tokens": first["prompt_tokens"], "completion_tokens": completion_tokens,
                      "total_tokens": first["prompt_tokens"] + completion_tokens}}
    return _line(key, first["id"], {"status_code": 200, "body": body})


def error_line(row: dict) -> dict:
    """The error-file line of an error row."""
    kind, message = row["error_type"], row["message"]
    custom_id = _custom_id(row["input"])
    key = _ids(row["job_id"], custom_id, row["id"])
    if kind == "invalid_request":
        code, param, text = parse_request_error(message)
        if code in NOT_A_REQUEST:
            return _line(key, custom_id, error={"code": code, "message": text})
        status = 404 if code == "model_not_found" else 400  # as the online API answers
        return _line(key, custom_id, _error_response(status, text, "invalid_request_error", code, param))
    if kind in LINE_ERRORS:
        return _line(key, custom_id, error={"code": LINE_ERRORS[kind], "message": message})
    status, error_type, code = RESPONSE_ERRORS.get(kind, (500, "server_error", kind))
    return _line(key, custom_id, _error_response(status, message, error_type, code, None))


def pending_line(job_id: str, row: dict, code: str, message: str) -> dict:
    """The error line of a request that never ran (code batch_cancelled or batch_expired)."""
    custom_id = row.get("custom_id")
    return _line(_ids(job_id, custom_id, row["_gf_id"]), custom_id, error={"code": code, "message": message})


def _error_response(status: int, message: str, kind: str, code: str | None, param: str | None) -> dict:
    return {"status_code": status, "body": {"error": {"message": message, "type": kind, "param": param,
                                                      "code": code}}}


def _custom_id(raw: str | None) -> str | None:
    """The custom_id an error row's input names, if it is a JSON object with a text custom_id."""
    try:
        data = json.loads(raw or "")
    except json.JSONDecodeError:
        return None
    value = data.get("custom_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


class OpenAIFilesSink:
    """Writes each committed part as OpenAI batch lines, under the part's name (genfarm.batch.sink.Sink)."""

    def __init__(self, output: str):
        self.ledger = Ledger(output)

    def path(self, name: str, errors: bool) -> str:
        return part_lines_path(self.ledger, name, errors)

    def write(self, table: pa.Table, name: str, errors: bool) -> str:
        rows = table.to_pylist()
        lines = [error_line(row) for row in rows] if errors else output_lines(rows)
        final = self.path(name, errors)
        _write_lines(self.ledger, final, lines)
        return final


def part_lines_path(ledger: Ledger, name: str, errors: bool) -> str:
    return ledger.path(FOLDER, "errors" if errors else "output", os.path.splitext(name)[0] + ".jsonl")


def _write_lines(ledger: Ledger, final: str, lines: Iterable[dict | str]) -> int:
    count = 0
    with atomic_path(ledger.fs, final, ledger.tmp_dir) as path, ledger.fs.open_output_stream(path) as out:
        for line in lines:
            text = line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)
            out.write((text + "\n").encode())
            count += 1
    return count


def _part_lines(ledger: Ledger, part: str, errors: bool) -> Iterator[str]:
    """The OpenAI lines of a committed Parquet part: its sink's file, or made from the part if there is none (a part
    committed before the sink ran) or it is stale (`genfarm retry-errors` took rows out of an error part: one line
    per error row no longer holds)."""
    path = part_lines_path(ledger, os.path.basename(part), errors)
    if ledger.fs.get_file_info(path).type == pafs.FileType.File:
        with ledger.fs.open_input_stream(path) as stream:
            lines = [line for line in stream.read().decode().splitlines() if line.strip()]
        if not errors or len(lines) == pq.ParquetFile(part, filesystem=ledger.fs).metadata.num_rows:
            yield from lines
            return
    rows = pq.read_table(part, filesystem=ledger.fs).to_pylist()
    for line in ([error_line(row) for row in rows] if errors else output_lines(rows)):
        yield json.dumps(line, ensure_ascii=False)


def collect(output: str, pending: tuple[str, str] | None = None) -> dict:
    """Join the lines of every committed part into OUTPUT/_openai/output.jsonl and errors.jsonl; with `pending`
    (code, message), every input request no part holds gets an error line too. Returns the paths and counts:
    completed and failed requests, prompt and completion tokens of the completed ones."""
    ledger = Ledger(output)
    usage = {"prompt_tokens": 0, "completion_tokens": 0}

    def results() -> Iterator[str]:
        for part in ledger.parts():
            for line in _part_lines(ledger, part, errors=False):
                counts = json.loads(line)["response"]["body"]["usage"]
                usage["prompt_tokens"] += counts["prompt_tokens"]
                usage["completion_tokens"] += counts["completion_tokens"]
                yield line

    def failures() -> Iterator[str | dict]:
        for part in ledger.parts(errors=True):
            yield from _part_lines(ledger, part, errors=True)
        if pending is not None:
            yield from pending_lines(ledger, *pending)

    paths = {"output": ledger.path(FOLDER, OUTPUT_FILE), "errors": ledger.path(FOLDER, ERROR_FILE)}
    completed = _write_lines(ledger, paths["output"], results())
    failed = _write_lines(ledger, paths["errors"], failures())
    return {**paths, "completed": completed, "failed": failed, **usage}


def pending_lines(ledger: Ledger, code: str, message: str) -> Iterator[dict]:
    """An error line for every input request no committed part holds."""
    manifest = ledger.manifest()
    spec = InputSpec.model_validate(manifest["spec"]["input"])
    fs, files = list_inputs(spec)
    for file in files:
        done = ledger.done_ids(file.key)
        for row in source_rows(fs, file, spec):
            if row["_gf_id"] not in done:
                yield pending_line(manifest["job_id"], row, code, message)


def request_counts(output: str) -> tuple[int, int]:
    """(completed, failed) requests committed so far: result rows of a first sample, error rows."""
    ledger = Ledger(output)
    parts = ledger.parts()
    completed = ds.dataset(parts, filesystem=ledger.fs, format="parquet").count_rows(
        filter=pc.field("sample_index") == 0) if parts else 0
    return completed, ledger.count().errors
