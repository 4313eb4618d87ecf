"""Reading the input: files from a path, glob or URI, their rows in order with stable ids, as Arrow blocks.

Each row gets a stable id (the id column, or FILE:ROW_NUMBER). Rows that cannot even be parsed are passed on
with `_gf_error` set, to be written as error rows by the worker instead of stopping the job. A task with an expander
(genfarm.task.Expander) turns each input row into its work rows here, in the read task.
"""

from __future__ import annotations

import codecs
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
from genfarm.storage import glob, glob_base, is_local, is_uri, open_fs, storage_error
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
SCHEMA_SAMPLE_ROWS = 1000  # per file
CSV_BLOCK_BYTES = 64 << 20  # a CSV value (and so its row) may be as long as this


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
        raise input_error(spec, err) from None


def input_error(spec: InputSpec, err: OSError) -> UserError:
    """The one-line error of an input that the driver cannot read before the job starts."""
    if is_uri(spec.path):
        return storage_error("input.path", spec.path, err, "read")
    return UserError("input.path", f"cannot read {spec.path} ({reason(err)})",
                     "check that it exists and that genfarm may read it")


def _list_inputs(spec: InputSpec) -> tuple[pafs.FileSystem, list[InputFile]]:
    fs, root = open_fs(spec.path)
    if any(ch in root for ch in "*?["):
        paths = sorted(globlib.glob(root, recursive=True)) if is_local(fs) else glob(fs, root)
        base = glob_base(root)
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
        size = fs.get_file_info(path).size
        if size == 0 and len(paths) > 1:
            continue  # an empty file (0 bytes, not even a Parquet footer) beside others holds no rows
        files.append(InputFile(path, os.path.relpath(path, base), size or 0, fmt))
    if not files:
        raise UserError("input.path", f"no Parquet, JSONL or CSV files with data match {spec.path}",
                        "check the path or glob, e.g. examples/topics.jsonl")
    return fs, files


def _parquet(fs: pafs.FileSystem, file: InputFile) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(file.path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as err:
        raise unreadable(file, err, "write it again, or move it out of the input") from None


def unreadable(file: InputFile, err: Exception, fix: str) -> UserError:
    """The one-line error of an input file that cannot be read as a whole."""
    return UserError("input.path", f"{file.name} cannot be read as {file.format} ({reason(err)})", fix)


def reason(err: Exception) -> str:
    """The first line of an error's message (Arrow's run on with details), else its type."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def read_rows(fs: pafs.FileSystem, file: InputFile) -> Iterator[tuple[dict | None, str | None, str | None]]:
    """(row, error, raw) for every row of a file, in order; a row that cannot be parsed comes as an error."""
    if file.format == "parquet":
        yield from _read_parquet(fs, file)
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


def _read_parquet(fs: pafs.FileSystem, file: InputFile):
    """Row group by row group: the rows of one that cannot be read (a corrupt page) are bad_row errors, and the
    file's other row groups are read."""
    parquet = _parquet(fs, file)
    for group in range(parquet.num_row_groups):
        done = 0
        try:
            for batch in parquet.iter_batches(batch_size=1024, row_groups=[group]):
                for row in batch.to_pylist():
                    yield row, None, None
                    done += 1
        except (OSError, pa.ArrowException) as err:
            message = f"bad_row: row group {group} of {file.name} cannot be read ({reason(err)})"
            for _ in range(parquet.metadata.row_group(group).num_rows - done):
                yield None, message, None


def _read_jsonl(fs: pafs.FileSystem, file: InputFile):
    with fs.open_input_stream(file.path) as stream:
        for number, data in enumerate(_byte_lines(stream), start=1):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as err:
                yield None, (f"bad_json: line {number}: not UTF-8 (byte 0x{data[err.start]:02x} at offset "
                             f"{err.start})"), data.decode("utf-8", errors="replace")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield None, f"bad_json: line {number}, column {err.colno}: {err.msg}", line
                continue
            except (ValueError, RecursionError) as err:  # an integer of 4300+ digits, nesting past Python's stack
                yield None, f"bad_json: line {number}: {err}", line
                continue
            if not isinstance(row, dict):
                yield None, f"bad_json: line {number}: expected a JSON object, got {type(row).__name__}", line
            elif "\\u" in line and not _encodable(row):
                yield None, f"bad_json: line {number}: a \\u escape is half a surrogate pair, not a character", line
            else:
                yield row, None, None


def _encodable(row: dict) -> bool:
    """Whether a parsed row is text UTF-8 can hold: JSON's \\ud800 alone parses, but is no character."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    except (ValueError, RecursionError):
        return False
    return isinstance(row, dict) and set(OPENAI_BATCH_SCHEMA.names) <= set(row)


def _lines(stream) -> Iterator[str]:
    for line in _byte_lines(stream):
        yield line.decode("utf-8", errors="replace")


def _byte_lines(stream) -> Iterator[bytes]:
    """A stream's lines, without the UTF-8 byte order mark some editors put at its start."""
    lines = _split_lines(stream)
    first = next(lines, None)
    if first is not None:
        yield first.removeprefix(codecs.BOM_UTF8)
        yield from lines


def _split_lines(stream) -> Iterator[bytes]:
    pending = b""
    while chunk := stream.read(1 << 20):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from lines
    if pending:
        yield pending


def _read_csv(fs: pafs.FileSystem, file: InputFile):
    for batch, error, raw in _csv_batches(fs, file):
        if batch is None:
            yield None, error, raw
        else:
            for row in batch.to_pylist():
                yield row, None, None


def _csv_batches(fs: pafs.FileSystem, file: InputFile):
    """(batch, None, None) for the rows of a CSV file, (None, error, raw text) for a line with the wrong number of
    fields. A file that is not UTF-8 CSV, or whose last quote is never closed, is refused as a whole."""
    bad: list[tuple[str, str]] = []

    def on_invalid(row) -> str:
        if row.text.strip():  # a line of spaces is blank, as in JSONL
            # no line number: pyarrow's is unknown or off where quoted values span lines; the row's text is kept
            bad.append((f"bad_row: expected {row.expected_columns} fields, got {row.actual_columns}", row.text))
        return "skip"

    fix = ("save it as UTF-8 CSV with a header line; quote a value that holds a comma, quote or line break, and "
           "double a quote inside it")
    read = pacsv.ReadOptions(block_size=max(1 << 20, min(file.size + 1, CSV_BLOCK_BYTES)))
    parse = pacsv.ParseOptions(invalid_row_handler=on_invalid, newlines_in_values=True)
    last = None
    try:
        with fs.open_input_stream(file.path) as stream:
            header = pacsv.open_csv(stream, read_options=read, parse_options=parse).schema.names  # all text
        bad.clear()
        with fs.open_input_stream(file.path) as stream:
            reader = pacsv.open_csv(
                stream, read_options=read, parse_options=parse,
                convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in header}),
            )
            for batch in reader:
                while bad:
                    yield None, *bad.pop(0)
                if batch.num_rows:
                    last = batch.slice(batch.num_rows - 1).to_pylist()[0]
                    yield batch, None, None
    except pa.ArrowInvalid as err:
        if "Empty CSV file" in str(err):
            return
        raise unreadable(file, err, fix) from None
    for message, text in bad:
        yield None, message, text
    if last is not None and _unclosed_quote(fs, file, last[header[-1]]):
        raise UserError("input.path", f"{file.name}: the quote opened in its last row is never closed, so the rest "
                        "of the file reads as one value", fix)


def _unclosed_quote(fs: pafs.FileSystem, file: InputFile, value: str | None) -> bool:
    """Whether the file's last value ran to the end of the file: a quoted value closed with its quote ends before
    the file does, one whose quote is never closed takes in every line after it (the file's last bytes)."""
    if not value or "\n" not in value:
        return False
    tail = value.encode()
    with fs.open_input_file(file.path) as stream:
        size = stream.size()
        stream.seek(max(0, size - len(tail)))
        return stream.read() == tail


def infer_schema(fs: pafs.FileSystem, file: InputFile) -> pa.Schema:
    """The data columns of one file."""
    return input_schema(fs, [file])


def input_schema(fs: pafs.FileSystem, files: list[InputFile]) -> pa.Schema:
    """The data columns every block carries: every file's columns, in the order they first appear. A column whose
    type differs between files takes a type that holds them all (int and float: float), else the type of most of
    its values (the others become bad_type rows)."""
    kinds: dict[str, Counter] = {}
    for file in files:
        for name, kind, weight in _file_columns(fs, file):
            kinds.setdefault(name, Counter())[kind] += weight
    if not kinds:
        problem = f"{files[0].name} has no readable rows" if len(files) == 1 else \
            f"none of the {len(files)} input files has a readable row"
        raise UserError("input.path", problem, "check that the input holds data")
    return pa.schema([pa.field(name, merged_type(counts)) for name, counts in kinds.items()])


def _file_columns(fs: pafs.FileSystem, file: InputFile) -> list[tuple[str, pa.DataType, int]]:
    """(column, Arrow type, how many values have it) of one file: Parquet from its footer, CSV from a sample (its
    header names every row's columns), JSONL from every row: each column's first SCHEMA_SAMPLE_ROWS values decide
    its type, and a later value is taken too where it brings a nested key the sample lacks. A key seen only after a
    sample would otherwise be no column, and its values would vanish from the rows that have them."""
    if file.format == "parquet":
        parquet = _parquet(fs, file)
        return [(field.name, field.type, parquet.metadata.num_rows) for field in parquet.schema_arrow]
    if file.format == "text":
        return [("text", pa.string(), 1)]
    if file.format == OPENAI_BATCH:
        return [(field.name, field.type, 1) for field in OPENAI_BATCH_SCHEMA]
    sampled: dict[str, list] = {}
    nested: dict[str, set[str]] = {}  # per column, the nested keys its sampled values hold
    for number, (row, _, _) in enumerate(read_rows(fs, file)):
        if file.format == "csv" and number >= SCHEMA_SAMPLE_ROWS:
            break  # every CSV row has the header's columns, and only text
        for name, value in (row or {}).items():
            values = sampled.setdefault(name, [])
            if len(values) < SCHEMA_SAMPLE_ROWS:
                values.append(value)
                nested.setdefault(name, set()).update(key_paths(value))
            elif isinstance(value, (dict, list)) and has_new_key(value, nested[name]):
                values.append(value)
                nested[name].update(key_paths(value))
    return [(name, column_type(values), sum(v is not None for v in values)) for name, values in sampled.items()]


def has_new_key(value, known: set[str], prefix: str = "") -> bool:
    """Whether a JSON value holds a nested key `known` lacks (key_paths(value) <= known, without building them)."""
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}.{key}"
            if path not in known or (isinstance(item, (dict, list)) and has_new_key(item, known, path)):
                return True
    elif isinstance(value, list):
        return any(isinstance(item, (dict, list)) and has_new_key(item, known, f"{prefix}[]") for item in value)
    return False


def key_paths(value, prefix: str = "") -> set[str]:
    """The nested keys of a JSON value, as paths (a list's items under "[]")."""
    if isinstance(value, dict):
        return {path for key, item in value.items()
                for path in (f"{prefix}.{key}", *key_paths(item, f"{prefix}.{key}"))}
    if isinstance(value, list):
        return {path for item in value for path in key_paths(item, f"{prefix}[]")}
    return set()


def merged_type(counts: Counter) -> pa.DataType:
    """One type for a column from the types files give it, weighed by their values."""
    kinds = [kind for kind, _ in counts.most_common() if not pa.types.is_null(kind)] or list(counts)
    if len(kinds) == 1:
        return kinds[0]
    try:
        return pa.unify_schemas([pa.schema([("c", kind)]) for kind in kinds], promote_options="permissive")[0].type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return kinds[0]


def column_type(values: list) -> pa.DataType:
    """Arrow type of a sampled column: mixed values take the most common kind (the rest become bad_type rows);
    a column null in every sampled row could hold anything later, so it is carried as text, and so is one whose
    values fit no Arrow type (integers past 64 bits)."""
    try:
        kind = pa.array(values).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        kinds = Counter(_value_type(v) for v in values if v is not None)
        kind = next((k for k, _ in kinds.most_common() if k is not None), pa.null())
    return pa.string() if pa.types.is_null(kind) else kind


def _value_type(value) -> pa.DataType | None:
    try:
        return pa.array([value]).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return None


def count_rows(fs: pafs.FileSystem, files: list[InputFile], limit: int | None) -> int:
    """Total input rows, for progress and to know when a job is complete: Parquet from footers, JSONL by a streaming
    line count, CSV by parsing it (a quoted value may span lines)."""
    total = 0
    for file in files:
        if file.format == "parquet":
            n = _parquet(fs, file).metadata.num_rows
        elif file.format == "text":
            n = 1
        elif file.format == "csv":
            n = sum(1 if batch is None else batch.num_rows for batch, _, _ in _csv_batches(fs, file))
        else:
            n = sum(1 for line in _lines(fs.open_input_stream(file.path)) if line.strip())
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
                value = str(row[id_column])
                if value in seen:  # an error row of its own id: the ledger knows the first row's as done
                    error, raw, row = f"duplicate_id: id {value!r} appears twice in {file.name}", _dump(row), None
                else:
                    row_id = value
                seen.add(value)
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
                fixed.append({**meta, "_gf_error": f"bad_type: {misfit(data, schema) or err}", "_gf_raw": _dump(data)})
        return pa.Table.from_pylist(fixed, schema=full)


def misfit(data: dict, schema: pa.Schema) -> str | None:
    """Which value of a row does not fit its column's type (the type most of the input has), if one is to blame."""
    for field in schema:
        value = data.get(field.name)
        try:
            pa.array([value], type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
            shown = _dump(value)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            return f"column {field.name!r} holds {field.type} in this input, got {type(value).__name__} {shown}"
    return None


def _dump(row: dict) -> str:
    return json.dumps(row, default=str, ensure_ascii=False)
