"""Sinks write a committed batch's rows under the name the ledger gave them.

The Parquet sink is the record the ledger reads back (a row is done when a Parquet part holds it), so it is always
written last: a sink that writes another format (OpenAI batch JSONL, say) writes first, under the same part name, and a
batch retried after a crash in between rewrites that file instead of adding a second copy.
"""

from __future__ import annotations

from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from genfarm.storage import atomic_path


class Sink(Protocol):
    def write(self, table: pa.Table, name: str, errors: bool) -> str:
        """Write one part (result rows, or error rows with `errors`) so that it appears whole; return its path."""
        ...


class ParquetSink:
    """OUTPUT/NAME.parquet for results, OUTPUT/_errors/NAME.parquet for error rows."""

    def __init__(self, ledger):
        self.ledger = ledger

    def write(self, table: pa.Table, name: str, errors: bool) -> str:
        final = self.ledger.part_path(name, errors)
        with atomic_path(self.ledger.fs, final, self.ledger.tmp_dir) as path:
            pq.write_table(table, path, filesystem=self.ledger.fs)
        return final
