"""Compaction: at the end of a job, each input file's small parts (one per batch) merged into a few large ones.

A part is committed per batch so that a crash loses at most the batches in flight; a long job with small batches
then leaves tens of thousands of small files, slow for every reader (pandas, DuckDB, a resume that counts them).
Merging keeps what makes a row done: a row is in exactly one committed part, under the key of its input file, so
resume, retry-errors and inspect read a compacted folder as they read any other.

A crash can strike between the merged part appearing and the parts it replaces being deleted. The merge is
therefore announced first, in _genfarm/compacting.json, with the rows it will hold; whoever opens the folder next (a
run, retry-errors, status) calls `finish`, which deletes the replaced parts if the merged one appeared whole, or
drops the note (and a merged part that is not whole: an object store can be left with part of an upload) if not.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from genfarm.batch.ledger import META, Ledger, part_name
from genfarm.storage import atomic_path

TARGET_BYTES = 128 * 2**20  # what analytics engines read well; parts already half this size are left alone
ROW_GROUP_ROWS = 16_384  # rows per row group of a merged part, so a reader is not handed 64-row groups
NOTE = f"{META}/compacting.json"
PART_NAME = re.compile(r"[0-9a-f]{12}-[0-9]{9,}-[0-9a-f]{10}\.parquet")  # ledger.part_name


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
        merged = [group for group in runs(sizes, target_bytes) if merge(ledger, group, errors)]
        before += len(sizes)
        after += len(sizes) - sum(len(group) - 1 for group in merged)
    return Compacted(before, after)


def runs(sizes: list[tuple[str, int]], target_bytes: int) -> list[list[str]]:
    """Neighbouring small parts (in name order: input file, then first row) of one input file, up to
    `target_bytes` together; runs of one part are left out, as there is nothing to merge. Files not named as the
    ledger names parts are never touched."""
    found: list[list[str]] = [[]]
    total, key = 0, None
    for path, size in sizes:
        part_key = os.path.basename(path).split("-", 1)[0]
        small = size < target_bytes // 2 and PART_NAME.fullmatch(os.path.basename(path)) is not None
        if not small or part_key != key or total + size > target_bytes:
            found.append([])
            total = 0
        key = part_key
        if small:
            found[-1].append(path)
            total += size
    return [run for run in found if len(run) > 1]


def merge(ledger: Ledger, parts: list[str], errors: bool) -> bool:
    """Write `parts` as one part (each read once), then delete them; parts of different schemas stay as they are."""
    key, first, _ = os.path.basename(parts[0]).split("-", 2)
    replaced = [os.path.basename(p) for p in parts]
    name = part_name(key, int(first), replaced)  # named after the parts it replaces, which are named after their rows
    rows = sum(pq.ParquetFile(p, filesystem=ledger.fs).metadata.num_rows for p in parts)
    ledger.write_json(NOTE, {"part": name, "errors": errors, "replaces": replaced, "rows": rows})
    try:
        with atomic_path(ledger.fs, ledger.part_path(name, errors), ledger.tmp_dir) as path:
            write_merged(ledger.fs, parts, path)
        merged = True
    except SchemaMismatch:
        merged = False  # the merged part never appeared: finish drops the note and the parts stay
    finish(ledger)
    return merged


class SchemaMismatch(Exception):
    pass


def write_merged(fs, parts: list[str], path: str) -> None:
    writer, pending = None, []
    try:
        for part in parts:
            table = pq.read_table(part, filesystem=fs)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, filesystem=fs)
            elif not table.schema.equals(writer.schema, check_metadata=False):
                raise SchemaMismatch(part)
            pending.append(table)
            if sum(t.num_rows for t in pending) >= ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(pending))
                pending = []
        if pending:
            writer.write_table(pa.concat_tables(pending))
    finally:
        if writer is not None:
            writer.close()


def finish(ledger: Ledger) -> None:
    """Complete or drop a merge a crash interrupted: afterwards every row is in exactly one part again."""
    note = ledger.read_json(NOTE)
    if note is None:
        return
    fs, errors = ledger.fs, note["errors"]
    merged = ledger.part_path(note["part"], errors)
    if whole(fs, merged, note.get("rows")):
        for name in note["replaces"]:
            if name != note["part"]:
                ledger.withdraw(name, errors)  # (gone already if deleted before the crash)
    elif fs.get_file_info(merged).type == pafs.FileType.File and note["part"] not in note["replaces"]:
        fs.delete_file(merged)  # part of an upload: the parts it was to replace still hold every row
    fs.delete_file(ledger.path(NOTE))


def whole(fs, path: str, rows: int | None) -> bool:
    """Whether the merged part exists with every row it was to hold (`rows` None: a note that did not say)."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    if rows is None:
        return True
    try:
        return pq.ParquetFile(path, filesystem=fs).metadata.num_rows == rows
    except (OSError, pa.ArrowInvalid):  # no footer: not a whole Parquet file
        return False
