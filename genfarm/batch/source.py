"""Reading the input: files from a path, glob or URI, their rows in order with stable ids, as Arrow blocks.

Each row gets a stable id (the id column, or FILE:ROW_NUMBER). Rows that cannot even be parsed are passed on
with `_gf_error` set, to be written as error rows by the worker instead of stopping the job. A task with an expander
(genfarm.task.Expander) turns each input row into its work rows here, in the read task.
"""

from __future__ import annotations

import glob as globlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from genfarm.batch.ledger import source_key
from genfarm.errors import UserError
from genfarm.spec import InputSpec
from genfarm.storage import glob, is_local, is_uri, open_fs, storage_error
from genfarm.task import Expander

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
           ".csv": "csv"}
# OpenAI's batch input file: JSONL lines {custom_id, method, url, body}, read as rows of these four text columns
# (the body as JSON text) whose custom_id is the row id; a .jsonl file whose first line has these keys is one.
OPENAI_BATCH = "openai-batch"
OPENAI_BATCH_SCHEMA = pa.schema([(name, pa.string()) for name in ("custom_id", "method", "url", "body")])
META_COLUMNS = ["_gf_id", "_gf_source", "_gf_row", "_gf_error", "_gf_raw", "_gf_task"]
META_SCHEMA = pa.schema([("_gf_id", pa.string()), ("_gf_source", pa.string()), ("_gf_row", pa.int64()),
                         ("_gf_error", pa.string()), ("_gf_raw", pa.string()),
                         ("_gf_task", pa.string())])  # the task's own data of a work row (JSON), set by its expander
SCHEMA_SAMPLE_ROWS = 1000


@dataclass(frozen=True)
class InputFile:
    path: str  # as the filesystem knows it
    name: str  # relative to the input root: what ids and provenance show
    size: int
    format: str

    @property
    def key(self) -> str:
        return source_key(self.name)


def list_inputs(spec: InputSpec) -> tuple[pafs.FileSystem, list[InputFile]]:
    """Expand input.path (file, folder, glob, or URI) into the files to read; an object store that refuses (no such
    bucket, no credentials) is a one-line error."""
    try:
        return _list_inputs(spec)
    except OSError as err:
        if not is_uri(spec.path):
            raise
        raise storage_error("input.path", spec.path, err, "read") from None


def _list_inputs(spec: InputSpec) -> tuple[pafs.FileSystem, list[InputFile]]:
    fs, root = open_fs(spec.path)
    if any(ch in root for ch in "*?["):
        paths = sorted(globlib.glob(root, recursive=True)) if is_local(fs) else glob(fs, root)
        base = root.split("*")[0].rsplit("/", 1)[0]
    else:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise UserError("input.path", f"{spec.path} does not exist", "check the path or pass --set input.path=...")
        if info.type == pafs.FileType.Directory:
            selector = pafs.FileSelector(root, recursive=True)
            paths = sorted(i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File)
            paths = [p for p in paths if not os.path.basename(p).startswith(("_", "."))]
            base = root
        else:
            paths, base = [root], os.path.dirname(root)
    files = []
    for path in paths:
        fmt = spec.format if spec.format != "auto" else FORMATS.get(os.path.splitext(path)[1].lower())
        if spec.format == "auto" and fmt == "jsonl" and _is_openai_batch(fs, path):
            fmt = OPENAI_BATCH
        if fmt is None:
            if len(paths) == 1:
                raise UserError("input.format", f"cannot tell the format of {path}",
                                "name it .parquet, .jsonl or .csv, or set input.format")
            continue  # a folder may hold other files (READMEs, checksums): read only the data files
        size = fs.get_file_info(path).size or 0
        files.append(InputFile(path, os.path.relpath(path, base), size, fmt))
    if not files:
        raise UserError("input.path", f"no Parquet, JSONL or CSV files match {spec.path}",
                        "check the path or glob, e.g. examples/topics.jsonl")
    return fs, files


def read_rows(fs: pafs.FileSystem, file: InputFile) -> Iterator[tuple[dict | None, str | None, str | None]]:
    """(row, error, raw) for every row of a file, in order; a row that cannot be parsed comes as an error."""
    if file.format == "parquet":
        for batch in pq.ParquetFile(file.path, filesystem=fs).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield row, None, None
    elif file.format == "text":
        with fs.open_input_stream(file.path) as stream:
            yield {"text": stream.read().decode("utf-8", errors="replace")}, None, None
    elif file.format == "csv":
        yield from _read_csv(fs, file)
    elif file.format == OPENAI_BATCH:
        for row, error, raw in _read_jsonl(fs, file):
            yield (None if row is None else _openai_request(row)), error, raw
    else:
        yield from _read_jsonl(fs, file)


def _read_jsonl(fs: pafs.FileSystem, file: InputFile):
    with fs.open_input_stream(file.path) as stream:
        for number, line in enumerate(_lines(stream), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield None, f"bad_json: line {number}: {err.msg}", line
                continue
            if not isinstance(row, dict):
                yield None, f"bad_json: line {number}: expected a JSON object, got {type(row).__name__}", line
            else:
                yield row, None, None


def _openai_request(line: dict) -> dict:
    """An OpenAI batch request line as a row of text columns: the body as JSON text, a value that should be text
    but is not as its JSON (for the task to refuse); other keys are dropped, as OpenAI ignores them."""
    row = {key: line.get(key) for key in OPENAI_BATCH_SCHEMA.names}
    return {key: value if value is None or (isinstance(value, str) and key != "body")
            else json.dumps(value) for key, value in row.items()}


def _is_openai_batch(fs: pafs.FileSystem, path: str) -> bool:
    """Whether a JSONL file's first line is an OpenAI batch request (custom_id, method, url, body)."""
    with fs.open_input_stream(path) as stream:
        first = next((line for line in _lines(stream) if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and set(OPENAI_BATCH_SCHEMA.names) <= set(row)


def _lines(stream) -> Iterator[str]:
    pending = b""
    while chunk := stream.read(1 << 20):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.decode("utf-8", errors="replace")
    if pending:
        yield pending.decode("utf-8", errors="replace")


def _read_csv(fs: pafs.FileSystem, file: InputFile):
    bad: list[str] = []

    def on_invalid(row) -> str:
        bad.append(f"bad_row: line {row.number}: expected {row.expected_columns} fields, got {row.actual_columns}")
        return "skip"

    parse = pacsv.ParseOptions(invalid_row_handler=on_invalid, newlines_in_values=True)
    with fs.open_input_stream(file.path) as stream:
        header = pacsv.open_csv(stream, parse_options=parse).schema.names  # CSV is text: every column a string
    bad.clear()
    with fs.open_input_stream(file.path) as stream:
        reader = pacsv.open_csv(
            stream,
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in header}),
            parse_options=parse,
        )
        for batch in reader:
            while bad:
                yield None, bad.pop(0), None
            for row in batch.to_pylist():
                yield row, None, None
    for message in bad:
        yield None, message, None


def infer_schema(fs: pafs.FileSystem, file: InputFile) -> pa.Schema:
    """The data columns every block will carry, taken from the first file."""
    if file.format == "parquet":
        return pq.read_schema(file.path, filesystem=fs)
    if file.format == "text":
        return pa.schema([("text", pa.string())])
    if file.format == OPENAI_BATCH:
        return OPENAI_BATCH_SCHEMA
    sample = []
    for row, _, _ in read_rows(fs, file):
        if row is not None:
            sample.append(row)
        if len(sample) >= SCHEMA_SAMPLE_ROWS:
            break
    if not sample:
        raise UserError("input.path", f"{file.name} has no readable rows", "check that the file holds data")
    names = list(dict.fromkeys(key for row in sample for key in row))
    return pa.schema([pa.field(name, column_type([row.get(name) for row in sample])) for name in names])


def column_type(values: list) -> pa.DataType:
    """Arrow type of a sampled column: mixed values take the most common kind (the rest become bad_type rows);
    a column null in every sampled row could hold anything later, so it is carried as text."""
    try:
        kind = pa.array(values).type
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        present = [v for v in values if v is not None]
        common = Counter(type(v) for v in present).most_common(1)[0][0]
        kind = pa.array([next(v for v in present if type(v) is common)]).type
    return pa.string() if pa.types.is_null(kind) else kind


def count_rows(fs: pafs.FileSystem, files: list[InputFile], limit: int | None) -> int:
    """Total input rows, for progress: Parquet from footers, text formats by a streaming line count."""
    total = 0
    for file in files:
        if file.format == "parquet":
            n = pq.ParquetFile(file.path, filesystem=fs).metadata.num_rows
        elif file.format == "text":
            n = 1
        else:
            n = sum(1 for line in _lines(fs.open_input_stream(file.path)) if line.strip())
            n -= 1 if file.format == "csv" else 0  # the header
        total += min(n, limit) if limit else n
    return total


def count_work_rows(fs: pafs.FileSystem, files: list[InputFile], spec: InputSpec, expander: Expander | None) -> int:
    """Rows the job will commit: input rows, or with an expander its work rows (one per bad row). Expanding streams
    every row once, which is cheap beside generating (a document's segmenting is one tokenizer pass)."""
    if expander is None:
        return count_rows(fs, files, spec.limit)
    return sum(1 for file in files for _ in source_rows(fs, file, spec, expander))


def source_rows(fs, file: InputFile, spec: InputSpec, expander: Expander | None = None) -> Iterator[dict]:
    """Every row of a file in order, with its id and meta columns; an expander turns each into its work rows."""
    seen: set[str] = set()
    id_column = spec.id_column or ("custom_id" if file.format == OPENAI_BATCH else None)
    for number, (row, error, raw) in enumerate(read_rows(fs, file)):
        if spec.limit and number >= spec.limit:
            break
        row_id = file.name if file.format == "text" else f"{file.name}:{number}"
        if row is not None and id_column:
            if row.get(id_column) is None:
                error, raw, row = f"missing_field: id column {id_column!r} is missing or null", _dump(row), None
            else:
                row_id = str(row[id_column])
                if row_id in seen:
                    error, raw, row = f"duplicate_id: id {row_id!r} appears twice in {file.name}", _dump(row), None
                seen.add(row_id)
        meta = {"_gf_id": row_id, "_gf_source": file.name, "_gf_row": number, "_gf_error": error, "_gf_raw": raw,
                "_gf_task": None}
        if expander is None:
            yield {**(row or {}), **meta}
        else:
            yield from expander.expand({**(row or {}), **meta})


def to_block(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows as one Arrow table of the job's schema; a row whose values do not fit becomes a bad_type error row."""
    full = pa.unify_schemas([META_SCHEMA, schema])
    try:
        return pa.Table.from_pylist(rows, schema=full)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        fixed = []
        for row in rows:
            try:
                pa.Table.from_pylist([row], schema=full)
                fixed.append(row)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as err:
                meta = {k: row[k] for k in META_COLUMNS}
                data = {k: v for k, v in row.items() if k not in META_COLUMNS}
                fixed.append({**meta, "_gf_error": f"bad_type: {err}", "_gf_raw": _dump(data)})
        return pa.Table.from_pylist(fixed, schema=full)


def _dump(row: dict) -> str:
    return json.dumps(row, default=str, ensure_ascii=False)
