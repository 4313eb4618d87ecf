"""The output folder and its ledger: atomic parts, the job manifest, and what is already done.

Layout of OUTPUT (local path or object-store URI):
    OUTPUT/*.parquet            results, one row per sample (pandas.read_parquet(OUTPUT) reads exactly these)
    OUTPUT/_errors/*.parquet    rows that could not be generated, with a typed reason
    OUTPUT/_genfarm/job.json    the manifest: spec, model revision, fingerprint
    OUTPUT/_summary.json        rows, tokens, time, tokens/s, errors
Readers skip names starting with '_' or '.', so half-written files (kept under _genfarm/tmp) are never seen.

A part is named after the rows it holds (source file key + first row + digest of the ids). A row is done exactly
when a committed part holds it, and a retried batch rewrites the same name instead of adding a second copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - makes pa.compute available
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from genfarm.errors import UserError

ERRORS, META = "_errors", "_genfarm"
DOCUMENTS = "_documents"  # reassembled translations; "_": pandas.read_parquet(OUTPUT) reads result rows only
RUN_FILE = f"{META}/run.json"


def open_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri and not uri.startswith("file://"):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))


def source_key(source_name: str) -> str:
    """Short stable key of an input file, the prefix of every part made from its rows."""
    return hashlib.sha1(source_name.encode()).hexdigest()[:12]


def part_name(source_key: str, first_row: int, ids: list[str]) -> str:
    digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:10]
    return f"{source_key}-{first_row:09d}-{digest}.parquet"


@dataclass
class DoneCounts:
    results: int  # result rows (samples)
    errors: int  # error rows

    def rows(self, samples_per_row: int) -> int:
        return self.results // samples_per_row + self.errors


class OutputStore:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = open_fs(uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    # --- writing ---------------------------------------------------------------------------------------------
    def commit(self, table: pa.Table, name: str, errors: bool = False) -> str:
        """Write a part so that it appears whole or not at all."""
        final = self.path(ERRORS, name) if errors else self.path(name)
        if not self.local:  # an object-store PUT is already all-or-nothing
            pq.write_table(table, final, filesystem=self.fs)
            return final
        tmp = self.path(META, "tmp", f"{name}.{uuid.uuid4().hex}")
        self.fs.create_dir(self.path(META, "tmp"), recursive=True)
        self.fs.create_dir(os.path.dirname(final), recursive=True)
        pq.write_table(table, tmp, filesystem=self.fs)
        self.fs.move(tmp, final)  # rename(2): atomic, and replaces a copy left by an earlier try of the same rows
        return final

    def write_json(self, relpath: str, data: dict) -> None:
        text = json.dumps(data, indent=2, default=str)
        target = self.path(relpath)
        self.fs.create_dir(os.path.dirname(target), recursive=True)
        tmp = target + ".tmp" if self.local else target
        with self.fs.open_output_stream(tmp) as out:
            out.write(text.encode())
        if tmp != target:
            self.fs.move(tmp, target)

    def read_json(self, relpath: str) -> dict | None:
        try:
            with self.fs.open_input_stream(self.path(relpath)) as f:
                return json.loads(f.read())
        except (FileNotFoundError, OSError):
            return None

    def manifest(self) -> dict:
        """The job manifest of this folder; a folder without one is a user error."""
        manifest = self.read_json(f"{META}/job.json")
        if manifest is None:
            raise UserError("OUTPUT", f"{self.uri} holds no genfarm job", "give the output.path of a job you ran")
        return manifest

    # --- reading ---------------------------------------------------------------------------------------------
    def parts(self, errors: bool = False, prefix: str = "") -> list[str]:
        folder = self.path(ERRORS) if errors else self.root
        selector = pafs.FileSelector(folder, allow_not_found=True, recursive=False)
        names = [info.path for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File]
        return sorted(p for p in names if p.endswith(".parquet") and os.path.basename(p).startswith(prefix))

    def done_ids(self, source_key: str) -> set[str]:
        """Ids already committed (as results or errors) for one input file; read by that file's reader only."""
        done: set[str] = set()
        for errors in (False, True):
            for part in self.parts(errors, prefix=f"{source_key}-"):
                done.update(pq.read_table(part, columns=["id"], filesystem=self.fs).column("id").to_pylist())
        return done

    def count(self) -> DoneCounts:
        """Rows committed so far, from Parquet footers only."""

        def rows(paths: list[str]) -> int:
            return sum(pq.ParquetFile(p, filesystem=self.fs).metadata.num_rows for p in paths)

        return DoneCounts(results=rows(self.parts()), errors=rows(self.parts(errors=True)))

    def column_sum(self, column: str, errors: bool = False) -> int:
        total = 0
        for part in self.parts(errors):
            values = pq.read_table(part, columns=[column], filesystem=self.fs).column(column)
            total += pa.compute.sum(values).as_py() or 0
        return total

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
                      pa.compute.is_in(table.column("error_type"), value_set=pa.array(types)))
            count = pa.compute.sum(chosen).as_py() or 0
            if not count:
                continue
            self.fs.create_dir(archive, recursive=True)
            pq.write_table(table, f"{archive}/{os.path.basename(part)}", filesystem=self.fs)
            kept = table.filter(pa.compute.invert(chosen))
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
        for name, kept_as in (("_summary.json", "_summary.json"), (f"{META}/job.json", "_job.json")):
            if self.fs.get_file_info(self.path(name)).type == pafs.FileType.File:
                self.fs.move(self.path(name), f"{target}/{kept_as}")  # '_' keeps readers of the folder to parquet
        return target
