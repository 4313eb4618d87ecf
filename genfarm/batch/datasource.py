"""The input as a Ray Data datasource: one read task per file, streaming rows in small blocks (each window of rows
ordered by prompt when a PromptOrder is given: genfarm/batch/order.py).

Each read task drops the rows a committed part already holds (it loads the done ids of its own file only), so
resuming never loads the ledger into the driver; the driver lists the output folder once and hands each read task
the names of its file's parts.
"""

from __future__ import annotations

from functools import partial

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from genfarm.batch.ledger import Ledger
from genfarm.batch.order import PromptOrder
from genfarm.batch.source import META_SCHEMA, InputFile, source_rows, to_block
from genfarm.spec import InputSpec
from genfarm.task import Expander


class PromptSource(Datasource):
    def __init__(self, fs, files: list[InputFile], schema: pa.Schema, spec: InputSpec, output: str,
                 block_rows: int = 256, expander: Expander | None = None, order: PromptOrder | None = None):
        super().__init__()
        self.fs, self.files, self.schema, self.spec = fs, files, schema, spec
        self.output, self.block_rows, self.expander, self.order = output, block_rows, expander, order

    def estimate_inmemory_data_size(self) -> int:
        return sum(f.size for f in self.files)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        committed = Ledger(self.output).parts_by_source()
        return [
            ReadTask(
                partial(read_blocks, self.fs, file, self.schema, self.spec, self.output, self.block_rows,
                        self.expander, committed.get(file.key, []), self.order),
                BlockMetadata(num_rows=None, size_bytes=file.size, input_files=[file.path], exec_stats=None),
                schema=pa.unify_schemas([META_SCHEMA, self.schema]),
            )
            for file in self.files
        ]


def read_blocks(fs, file: InputFile, schema: pa.Schema, spec: InputSpec, output: str, block_rows: int,
                expander: Expander | None = None, parts: list[str] | None = None, order: PromptOrder | None = None):
    done = Ledger(output).done_ids(file.key, parts)
    rows = (row for row in source_rows(fs, file, spec, expander) if row["_gf_id"] not in done)
    pending: list[dict] = []
    for row in order.arrange(rows) if order is not None else rows:
        pending.append(row)
        if len(pending) >= block_rows:
            yield to_block(pending, schema)
            pending = []
    if pending:
        yield to_block(pending, schema)


