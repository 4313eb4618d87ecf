"""Compaction (genfarm/batch/compact.py): a job folder's parts merged per input file, results and errors apart, with
every row in exactly one part before, after, and at each point a crash can strike in between."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genfarm.batch import compact
from genfarm.batch.ledger import Ledger, part_name, source_key


def folder(path, files: int = 2, parts: int = 5, rows: int = 8) -> Ledger:
    """A job folder as a run leaves it: `parts` result parts of `rows` rows per input file, one error part each."""
    store = Ledger(str(path))
    for f in range(files):
        key = source_key(f"input-{f}.jsonl")
        for p in range(parts):
            ids = [f"f{f}-{p * rows + r}" for r in range(rows)]
            store.commit(pa.table({"id": ids, "output_text": [f"text of {i}" for i in ids]}),
                         part_name(key, p * rows, ids))
        bad = [f"f{f}-bad"]
        store.commit(pa.table({"id": bad, "error_type": ["bad_row"]}), part_name(key, 10_000, bad), errors=True)
    return store


def committed(store: Ledger) -> tuple[list[str], list[str]]:
    """Every committed id, as a sorted list (a repeated id shows up twice): results, then errors."""
    return tuple(sorted(store.read(["id"], errors=errors).column("id").to_pylist()) for errors in (False, True))


def test_parts_merge_per_input_file_and_keep_every_row_once(tmp_path):
    store = folder(tmp_path / "out")
    before = committed(store)
    done_before = {key: store.done_ids(key) for key in store.parts_by_source()}
    result = compact.compact(store)
    assert result == compact.Compacted(parts_before=12, parts_after=4)  # 10 results + 2 errors -> one per file each
    assert committed(store) == before
    assert len(store.parts()) == 2 and len(store.parts(errors=True)) == 2
    assert {key: store.done_ids(key) for key in store.parts_by_source()} == done_before  # resume sees the same
    ids = pq.read_table(store.parts()[0]).column("id").to_pylist()
    assert ids == [f"{ids[0].split('-')[0]}-{i}" for i in range(40)]  # the input file's rows, in its order
    assert compact.compact(store) == compact.Compacted(4, 4)  # nothing left to merge
    assert not os.path.exists(tmp_path / "out" / compact.NOTE)


def test_large_parts_and_target_size_bound_the_merges(tmp_path):
    store = folder(tmp_path / "out", files=1, parts=6)
    size = max(nbytes for _, nbytes in store.part_sizes())
    compact.compact(store, target_bytes=size * 2 + 2)  # two parts fit in a merged one, and count as small
    assert len(store.parts()) == 3
    assert committed(store)[0] == sorted(f"f0-{i}" for i in range(48))
    compact.compact(store, target_bytes=size * 2 + 2)  # the merged parts are no longer small: left alone
    assert len(store.parts()) == 3


def test_parts_of_other_schemas_and_files_not_named_as_parts_are_left_alone(tmp_path):
    store = folder(tmp_path / "out", files=1, parts=2)
    ids = ["odd"]
    store.commit(pa.table({"id": ids, "output_text": [1]}), part_name(source_key("input-0.jsonl"), 500, ids))
    pq.write_table(pa.table({"id": ["mine"], "output_text": ["a file the user put here"]}), store.path("mine.parquet"))
    assert compact.compact(store) == compact.Compacted(5, 5)  # the count says what happened: nothing merged
    assert len(store.parts()) == 4 and len(committed(store)[0]) == 18  # nothing merged, nothing lost


class Crash(Exception):
    """A kill, struck at one point of a merge."""


@pytest.mark.parametrize("deleted", [0, 2], ids=["after the merged part appeared", "half-way through the deletes"])
def test_a_crash_after_a_merge_is_finished_by_the_next_opener(tmp_path, monkeypatch, deleted):
    store = folder(tmp_path / "out", files=1)
    before = committed(store)
    real_finish = compact.finish

    def crash_in_finish(ledger):
        note = ledger.read_json(compact.NOTE)
        if note is None:  # compact's own first look, before any merge
            return real_finish(ledger)
        for name in note["replaces"][:deleted]:
            ledger.fs.delete_file(ledger.part_path(name))
        raise Crash

    monkeypatch.setattr(compact, "finish", crash_in_finish)
    with pytest.raises(Crash):
        compact.compact(store)
    monkeypatch.undo()
    assert len(committed(store)[0]) == len(before[0]) + 40 - 8 * deleted  # the merged part and what is left
    compact.finish(Ledger(str(tmp_path / "out")))  # as the next run, retry-errors or status does
    assert committed(store) == before  # every row exactly once again
    assert len(store.parts()) == 1 and not os.path.exists(tmp_path / "out" / compact.NOTE)


def test_a_crash_before_the_merged_part_appears_leaves_the_parts(tmp_path, monkeypatch):
    store = folder(tmp_path / "out", files=1)
    before, parts = committed(store), store.parts()

    @contextmanager
    def killed_before_rename(fs, final, tmp_dir):
        fs.create_dir(tmp_dir, recursive=True)
        yield f"{tmp_dir}/{os.path.basename(final)}.partial"  # written, never moved into place
        raise Crash

    monkeypatch.setattr(compact, "atomic_path", killed_before_rename)
    with pytest.raises(Crash):
        compact.compact(store)
    monkeypatch.undo()
    compact.finish(Ledger(str(tmp_path / "out")))
    assert committed(store) == before and store.parts() == parts
    assert not os.path.exists(tmp_path / "out" / compact.NOTE)


def test_a_merged_part_left_half_written_is_dropped_and_the_parts_kept(tmp_path, monkeypatch):
    """On an object store a failed upload can leave part of the merged part (with a footer) under its final name,
    and the cleanup that would delete it can fail too: the next opener must not take it for the merged part."""
    store = folder(tmp_path / "out", files=1)
    before, parts = committed(store), store.parts()

    @contextmanager
    def upload_cut_short(fs, final, tmp_dir):
        yield final  # written straight to its final name, as on an object store

    def first_parts_only(fs, parts, path):
        real_write_merged(fs, parts[:2], path)  # a whole Parquet file holding only some of the rows
        raise Crash

    real_write_merged = compact.write_merged
    monkeypatch.setattr(compact, "atomic_path", upload_cut_short)
    monkeypatch.setattr(compact, "write_merged", first_parts_only)
    with pytest.raises(Crash):
        compact.compact(store)
    monkeypatch.undo()
    assert len(store.parts()) == len(parts) + 1  # the half merged part beside every part it was to replace
    compact.finish(Ledger(str(tmp_path / "out")))
    assert committed(store) == before and store.parts() == parts
    assert not os.path.exists(tmp_path / "out" / compact.NOTE)
