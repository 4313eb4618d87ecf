"""Reassembly of a batch job's documents: one row per document and target language in OUTPUT/_documents/.

Runs after the generation passes, one Ray task per input file. Each task reads its file's documents in order,
segments each again (deterministic), and takes the segments' translations from the ledger through a window that
holds only the committed parts overlapping the current document, so memory is bounded by a document and a few
parts, never by the file. A document missing a segment is written as `partial` with the failed segments and their
errors; re-running the job (resume, retry-errors) regenerates what is missing and writes every document again.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from genfarm.batch.ledger import Ledger
from genfarm.batch.source import InputFile, source_rows
from genfarm.rows import RowError
from genfarm.spec import InputSpec
from genfarm.storage import atomic_path
from genfarm.translation.assemble import reassemble
from genfarm.translation.splitter import DocumentSplitter, segment_id

DOCUMENTS = "_documents"  # reassembled translations; "_": pandas.read_parquet(OUTPUT) reads result rows only

DOCUMENT_SCHEMA = pa.schema([
    ("document_id", pa.string()), ("source_file", pa.string()), ("source_language", pa.string()),
    ("target_language", pa.string()), ("text", pa.string()),
    ("status", pa.string()),  # complete | partial (segments failed, listed) | failed (the document itself)
    ("failed_segments", pa.list_(pa.int32())), ("errors", pa.list_(pa.string())),
    ("truncated_segments", pa.list_(pa.int32())),  # answers cut at sampling.max_tokens
    ("segments", pa.int32()), ("translated_segments", pa.int32()), ("lost_placeholders", pa.int32()),
    ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("job_id", pa.string()),
    ("assembled_at", pa.timestamp("ms", tz="UTC")),
])
RESULT_COLUMNS = ["id", "source_row", "sample_index", "output_text", "finish_reason", "prompt_tokens",
                  "completion_tokens"]
ERROR_COLUMNS = ["id", "source_row", "error_type", "message"]
ROWS_PER_GROUP = 64


class LedgerWindow:
    """The committed rows of one input file, loaded part by part while its documents are read in order."""

    def __init__(self, store: Ledger, key: str):
        self.store = store
        spans = [self._span(path, errors) for errors in (False, True) for path in store.parts(errors, f"{key}-")]
        self.waiting = sorted(spans)
        self.loaded: list[tuple[int, bool, dict[int, list[dict]]]] = []  # (last row, errors?, rows by source row)

    def _span(self, path: str, errors: bool) -> tuple[int, int, str, bool]:
        """First and last source row a part holds, from its footer statistics."""
        meta = pq.ParquetFile(path, filesystem=self.store.fs).metadata
        column = meta.schema.names.index("source_row")
        stats = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)]
        if not stats or not all(s is not None and s.has_min_max for s in stats):
            return 0, 2**62, path, errors
        return min(s.min for s in stats), max(s.max for s in stats), path, errors

    def rows(self, source_row: int) -> tuple[dict[str, dict], dict[str, dict]]:
        """(results, errors) by id, of the rows made from input row `source_row`; rows must be asked in order."""
        while self.waiting and self.waiting[0][0] <= source_row:
            _, last, path, errors = self.waiting.pop(0)
            table = pq.read_table(path, columns=ERROR_COLUMNS if errors else RESULT_COLUMNS, filesystem=self.store.fs)
            if not errors:  # with sampling.n > 1 a document is assembled from the first sample
                table = table.filter(pc.equal(table["sample_index"], 0))
            by_row: dict[int, list[dict]] = {}
            for record in table.to_pylist():
                by_row.setdefault(record["source_row"], []).append(record)
            self.loaded.append((last, errors, by_row))
        self.loaded = [entry for entry in self.loaded if entry[0] >= source_row]
        results: dict[str, dict] = {}
        errors: dict[str, dict] = {}
        for _, is_error, by_row in self.loaded:
            for record in by_row.get(source_row, ()):
                (errors if is_error else results)[record["id"]] = record
        return results, errors


def assemble_file(output: str, fs, file: InputFile, spec: InputSpec, splitter: DocumentSplitter,
                  job_id: str) -> None:
    """Write OUTPUT/_documents/KEY.parquet for one input file, atomically, a row group at a time."""
    store = Ledger(output)
    window = LedgerWindow(store, file.key)
    pending: list[dict] = []
    with (atomic_path(store.fs, store.path(DOCUMENTS, f"{file.key}.parquet"), store.tmp_dir) as target,
          pq.ParquetWriter(target, DOCUMENT_SCHEMA, filesystem=store.fs) as writer):
        for row in source_rows(fs, file, spec):
            pending += document_rows(row, splitter, window, job_id)
            if len(pending) >= ROWS_PER_GROUP:
                writer.write_table(pa.Table.from_pylist(pending, schema=DOCUMENT_SCHEMA))
                pending = []
        if pending:
            writer.write_table(pa.Table.from_pylist(pending, schema=DOCUMENT_SCHEMA))


def document_rows(row: dict, splitter: DocumentSplitter, window: LedgerWindow, job_id: str) -> list[dict]:
    """One row per target language of a document: its reassembled text and how complete it is."""
    base = {"document_id": row["_gf_id"], "source_file": row["_gf_source"], "job_id": job_id,
            "assembled_at": datetime.now(UTC)}
    try:
        if row["_gf_error"]:
            raise RowError.parse(row["_gf_error"])
        text = splitter.text(row)
        source, targets = splitter.languages(row)
    except RowError as err:  # the document could not be segmented at all: its error row says why
        targets = splitter.settings.target_languages or [None]
        return [{**base, "target_language": target, "status": "failed", "errors": [f"{err.kind}: {err.message}"],
                 "segments": 0, "translated_segments": 0} for target in targets]
    segments = splitter.segments(text)
    translatable = [s for s in segments if s.translate]
    results, errors = window.rows(row["_gf_row"])
    rows = []
    for target in targets:
        translations, failed, messages, truncated, prompt_tokens, completion_tokens = {}, [], [], [], 0, 0
        for segment in translatable:
            key = segment_id(row["_gf_id"], target, segment.index)
            if key in results:
                record = results[key]
                translations[segment.index] = record["output_text"]
                prompt_tokens += record["prompt_tokens"]
                completion_tokens += record["completion_tokens"]
                if record["finish_reason"] == "length":
                    truncated.append(segment.index)
            else:
                failed.append(segment.index)
                error = errors.get(key)
                reason = f"{error['error_type']}: {error['message']}" if error else "not generated (run the job again)"
                messages.append(f"segment {segment.index}: {reason}")
        document = reassemble(segments, translations)
        rows.append({**base, "source_language": source, "target_language": target, "text": document.text,
                     "status": "partial" if failed else "complete", "failed_segments": failed, "errors": messages,
                     "truncated_segments": truncated, "segments": len(segments),
                     "translated_segments": len(translatable), "lost_placeholders": document.lost_placeholders,
                     "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens})
    return rows


def assemble_documents(output: str, fs, files: list[InputFile], spec: InputSpec, splitter: DocumentSplitter,
                       job_id: str) -> None:
    """Reassemble every input file's documents, one Ray task per file."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=2)(assemble_file)
    ray.get([task.remote(output, fs, file, spec, splitter, job_id) for file in files])


def document_counts(store: Ledger) -> dict | None:
    """Documents by status, from OUTPUT/_documents (None when the job has no documents)."""
    if store.fs.get_file_info(store.path(DOCUMENTS)).type != pafs.FileType.Directory:
        return None
    counts = {"complete": 0, "partial": 0, "failed": 0, **store.value_counts("status", folder=DOCUMENTS)}
    return {"documents": sum(counts.values()), **counts, "output": store.path(DOCUMENTS)}
