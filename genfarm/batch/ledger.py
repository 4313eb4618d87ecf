"""The exactly-once ledger of a job's output folder: which rows are done, under which part names, for which run.

Layout of OUTPUT (local path or object-store URI):
    OUTPUT/*.parquet            results, one row per sample (pandas.read_parquet(OUTPUT) reads exactly these)
    OUTPUT/_errors/*.parquet    rows that could not be generated, with a typed reason
    OUTPUT/_genfarm/job.json    the manifest: spec, model revision, fingerprint
    OUTPUT/_genfarm/run.json    the run token: the run that owns the folder now
    OUTPUT/_summary.json        rows, tokens, time, tokens/s, errors
Readers skip names starting with '_' or '.', so half-written files (kept under _genfarm/tmp) are never seen.

A part is named after the rows it holds (source file key + first row + digest of the ids). A row is done exactly
when a committed part holds it, and a retried batch rewrites the same name instead of adding a second copy. Writing
the parts is the sinks' job (genfarm/batch/sink.py); the ledger names them, commits them and reads them back.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from genfarm.batch.sink import ParquetSink, Sink
from genfarm.errors import UserError
from genfarm.storage import is_local, open_fs, write_text

ERRORS, META = "_errors", "_genfarm"
RUN_FILE = f"{META}/run.json"
MANIFEST = f"{META}/job.json"
SUMMARY = "_summary.json"


def source_key(source_name: str) -> str:
    """Short stable key of an input file, the prefix of every part made from its rows."""
    return hashlib.sha1(source_name.encode()).hexdigest()[:12]


def part_name(source_key: str, first_row: int, ids: list[str]) -> str:
    digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:10]
    return f"{source_key}-{first_row:09d}-{digest}.parquet"


FIRST_SAMPLE = pc.field("sample_index") == 0  # one result row per input row, whatever its number of samples


@dataclass
class DoneCounts:
    completed: int  # work rows with results (their first sample)
    errors: int  # error rows

    @property
    def rows(self) -> int:
        """Work rows accounted for: every one is either completed or an error row."""
        return self.completed + self.errors


class Ledger:
    def __init__(self, uri: str, sinks: Sequence[Sink] = ()):
        self.uri = uri
        self.fs, self.root = open_fs(uri)
        self.local = is_local(self.fs)
        self.tmp_dir = self.path(META, "tmp")
        # Other formats first; the Parquet record last, since it is what makes the rows done.
        self.sinks: list[Sink] = [*sinks, ParquetSink(self)]

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def part_path(self, name: str, errors: bool = False) -> str:
        return self.path(ERRORS, name) if errors else self.path(name)

    # --- writing ---------------------------------------------------------------------------------------------
    def commit(self, table: pa.Table, name: str, errors: bool = False) -> str:
        """Write a part through every sink, so that its rows are done exactly when the Parquet record exists."""
        for sink in self.sinks:
            final = sink.write(table, name, errors)
        return final

    def withdraw(self, name: str, errors: bool = False) -> None:
        """Delete a part's Parquet record if there is one (files of other sinks are read only through it)."""
        try:
            self.fs.delete_file(self.part_path(name, errors))
        except FileNotFoundError:
            pass

    def write_json(self, relpath: str, data: dict) -> None:
        write_text(self.fs, self.path(relpath), json.dumps(data, indent=2, default=str), self.tmp_dir)

    def read_json(self, relpath: str) -> dict | None:
        """The file's data, or None if there is no such file. A store that fails to answer raises: read as "no
        manifest", a passing error would let a run mix its rows with another job's settings."""
        try:
            with self.fs.open_input_stream(self.path(relpath)) as f:
                return json.loads(f.read())
        except (FileNotFoundError, NotADirectoryError):  # no such file, or OUTPUT is a file itself
            return None

    def manifest(self) -> dict:
        """The job manifest of this folder; a folder without one is a user error."""
        manifest = self.read_json(MANIFEST)
        if manifest is None:
            raise UserError("OUTPUT", f"{self.uri} holds no genfarm job", "give the output.path of a job you ran")
        return manifest

    def start_run(self, run_id: str, started_at: str) -> None:
        """Make `run_id` the folder's owner: workers of an earlier run that outlived their driver stop committing."""
        self.write_json(RUN_FILE, {"run_id": run_id, "started_at": started_at})

    def current_run(self) -> str | None:
        return (self.read_json(RUN_FILE) or {}).get("run_id")

    # --- reading ---------------------------------------------------------------------------------------------
    def parts(self, errors: bool = False, prefix: str = "", folder: str | None = None) -> list[str]:
        """Committed Parquet parts: results, error rows, or those of a task's own `folder` (e.g. _documents)."""
        return [path for path, _ in self.part_sizes(errors, prefix, folder)]

    def part_sizes(self, errors: bool = False, prefix: str = "", folder: str | None = None) -> list[tuple[str, int]]:
        """(path, bytes) of each committed part, as `parts` lists them."""
        folder = self.path(folder) if folder else self.path(ERRORS) if errors else self.root
        selector = pafs.FileSelector(folder, allow_not_found=True, recursive=False)
        return sorted((info.path, info.size) for info in self.fs.get_file_info(selector)
                      if info.type == pafs.FileType.File and info.path.endswith(".parquet")
                      and os.path.basename(info.path).startswith(prefix))

    def read(self, columns: list[str] | None = None, errors: bool = False, where=None, limit: int | None = None,
             folder: str | None = None) -> pa.Table | None:
        """Committed rows (results, error rows, or a task folder's) as one table, or None when there are none."""
        parts = self.parts(errors, folder=folder)
        if not parts:
            return None
        dataset = ds.dataset(parts, filesystem=self.fs, format="parquet")
        if limit is not None:
            return dataset.head(limit, columns=columns, filter=where)
        return dataset.to_table(columns=columns, filter=where)

    def parts_by_source(self) -> dict[str, list[str]]:
        """Every committed part (results and errors) by the key of the input file its rows came from: one listing of
        the folder for the whole job, not one per input file (a job of many files and parts would list it again
        for each)."""
        found: dict[str, list[str]] = {}
        for errors in (False, True):
            for part in self.parts(errors):
                found.setdefault(os.path.basename(part).split("-", 1)[0], []).append(part)
        return found

    def done_ids(self, source_key: str, parts: list[str] | None = None) -> set[str]:
        """Ids already committed (as results or errors) for one input file; read by that file's reader only.
        `parts`: the file's committed parts, when the caller listed them already (parts_by_source)."""
        if parts is None:
            parts = self.parts(prefix=f"{source_key}-") + self.parts(errors=True, prefix=f"{source_key}-")
        done: set[str] = set()
        for part in parts:
            done.update(pq.read_table(part, columns=["id"], filesystem=self.fs).column("id").to_pylist())
        return done

    def count(self) -> DoneCounts:
        """Rows committed so far. Counted by first samples, not result rows over n: a task can ask for another n
        per row (an OpenAI batch request's `n`). Parquet statistics answer where a row group holds first samples
        only, so mostly from footers."""
        errors = sum(pq.ParquetFile(p, filesystem=self.fs).metadata.num_rows for p in self.parts(errors=True))
        return DoneCounts(completed=self.count_rows(FIRST_SAMPLE), errors=errors)

    def column_sum(self, column: str, errors: bool = False, where=None) -> int:
        total = 0
        for part in self.parts(errors):
            values = pq.read_table(part, columns=[column], filters=where, filesystem=self.fs).column(column)
            total += pc.sum(values).as_py() or 0
        return total

    def value_counts(self, column: str, errors: bool = False, folder: str | None = None) -> dict[str, int]:
        """How often each value of a column occurs over every committed part (e.g. error types); a list column
        counts the values in its lists."""
        counts: dict[str, int] = {}
        for part in self.parts(errors, folder=folder):
            values = pq.read_table(part, columns=[column], filesystem=self.fs).column(column)
            if pa.types.is_list(values.type):
                values = pc.list_flatten(values)
            for item in pc.value_counts(values).to_pylist():
                counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
        return counts

    # --- un-committing ---------------------------------------------------------------------------------------
    def count_rows(self, where=None) -> int:
        """Committed result rows (that match a filter expression, e.g. pc.field("attempts") > 1)."""
        parts = self.parts()
        return ds.dataset(parts, filesystem=self.fs, format="parquet").count_rows(filter=where) if parts else 0

    def take_errors(self, types: list[str] | None, label: str) -> int:
        """Un-commit error rows (all, or those of the given types) so the next run generates them again.

        Each affected part is first copied whole to _genfarm/retried-LABEL/, then rewritten without the taken rows;
        a crash in between leaves the rows still committed, never lost.
        """
        taken = 0
        archive = self.path(META, f"retried-{label}")
        for part in self.parts(errors=True):
            table = pq.read_table(part, filesystem=self.fs)
            chosen = (pa.array([True] * table.num_rows) if not types else
                      pc.is_in(table.column("error_type"), value_set=pa.array(types)))
            count = pc.sum(chosen).as_py() or 0
            if not count:
                continue
            self.fs.create_dir(archive, recursive=True)
            pq.write_table(table, f"{archive}/{os.path.basename(part)}", filesystem=self.fs)
            kept = table.filter(pc.invert(chosen))
            if kept.num_rows:
                self.commit(kept, os.path.basename(part), errors=True)
            else:
                self.fs.delete_file(part)
            taken += count
        return taken

    def move_aside(self, label: str) -> str | None:
        """Keep an earlier run's results under _genfarm/previous-LABEL (ignored by readers) instead of deleting them."""
        existing = self.parts() + self.parts(errors=True)
        if not existing:
            return None
        target = self.path(META, f"previous-{label}")
        self.fs.create_dir(self.path(META, f"previous-{label}", ERRORS), recursive=True)
        for part in existing:
            rel = os.path.relpath(part, self.root)
            self.fs.move(part, f"{target}/{rel}")
        for name, kept_as in ((SUMMARY, SUMMARY), (MANIFEST, "_job.json")):
            if self.fs.get_file_info(self.path(name)).type == pafs.FileType.File:
                self.fs.move(self.path(name), f"{target}/{kept_as}")  # '_' keeps readers of the folder to parquet
        return target
