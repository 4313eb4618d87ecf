"""Compaction: at the end of a job, each input file's small parts (one per batch) merged into a few large ones.

A part is committed per batch so that a crash loses at most the batches in flight; a long job with small batches
then leaves tens of thousands of small files, slow for every reader (pandas, DuckDB, a resume that counts them).
Merging keeps what makes a row done: a row is in exactly one committed part, under the key of its input file, so
resume, retry-errors and inspect read a compacted folder as they read any other.

A crash can strike between the merged part appearing and the parts it replaces being deleted. The merge is
therefore announced first, in _genfarm/compacting.json; whoever opens the folder next (a run, retry-errors, inspect)
calls `finish`, which deletes the replaced parts if the merged one appeared, or drops the note if it did not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from genfarm.batch.ledger import META, Ledger, part_name
from genfarm.storage import atomic_path

TARGET_BYTES = 128 * 2**20  # what analytics engines read well; parts already half this size are left alone
ROW_GROUP_ROWS = 16_384  # rows per row group of a merged part, so a reader is not handed 64-row groups
NOTE = f"{META}/compacting.json"


@dataclass(frozen=True)
class Compacted:
    parts_before: int
    parts_after: int


def compact(ledger: Ledger, target_bytes: int = TARGET_BYTES) -> Compacted:
    """Merge runs of small parts of the same input file, results and error rows apart."""
    finish(ledger)
    before = after = 0
    for errors in (False, True):
        sizes = ledger.part_sizes(errors)
        groups = runs(sizes, target_bytes)
        before += len(sizes)
        after += len(sizes) - sum(len(group) - 1 for group in groups)
        for group in groups:
            merge(ledger, group, errors)
    return Compacted(before, after)


def runs(sizes: list[tuple[str, int]], target_bytes: int) -> list[list[str]]:
    """Neighbouring small parts (in name order: input file, then first row) of one input file, up to
    `target_bytes` together; runs of one part are left out, as there is nothing to merge."""
    found: list[list[str]] = [[]]
    total, key = 0, None
    for path, size in sizes:
        part_key = os.path.basename(path).split("-", 1)[0]
        small = size < target_bytes // 2
        if not small or part_key != key or total + size > target_bytes:
            found.append([])
            total = 0
        key = part_key
        if small:
            found[-1].append(path)
            total += size
    return [run for run in found if len(run) > 1]


def merge(ledger: Ledger, parts: list[str], errors: bool) -> bool:
    """Write `parts` as one part, then delete them; parts of different schemas are left as they are."""
    fs = ledger.fs
    schema = pq.read_schema(parts[0], filesystem=fs)
    if any(not pq.read_schema(p, filesystem=fs).equals(schema, check_metadata=False) for p in parts[1:]):
        return False
    ids = [i for p in parts for i in pq.read_table(p, columns=["id"], filesystem=fs).column("id").to_pylist()]
    key, first, _ = os.path.basename(parts[0]).split("-", 2)
    name = part_name(key, int(first), ids)
    ledger.write_json(NOTE, {"part": name, "errors": errors, "replaces": [os.path.basename(p) for p in parts]})
    with atomic_path(fs, ledger.part_path(name, errors), ledger.tmp_dir) as path, \
            pq.ParquetWriter(path, schema, filesystem=fs) as writer:
        pending: list[pa.Table] = []
        for part in parts:
            pending.append(pq.read_table(part, filesystem=fs))
            if sum(t.num_rows for t in pending) >= ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(pending))
                pending = []
        if pending:
            writer.write_table(pa.concat_tables(pending))
    finish(ledger)
    return True


def finish(ledger: Ledger) -> None:
    """Complete or drop a merge a crash interrupted: afterwards every row is in exactly one part again."""
    note = ledger.read_json(NOTE)
    if note is None:
        return
    fs, errors = ledger.fs, note["errors"]
    if fs.get_file_info(ledger.part_path(note["part"], errors)).type == pafs.FileType.File:
        for name in note["replaces"]:
            if name != note["part"]:
                try:
                    fs.delete_file(ledger.part_path(name, errors))
                except FileNotFoundError:  # deleted before the crash
                    pass
    fs.delete_file(ledger.path(NOTE))
