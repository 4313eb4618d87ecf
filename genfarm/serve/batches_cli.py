"""`genfarm batches`: operators see and cancel the batch API's batches of every key, straight from batches.storage."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Column, Table

from genfarm.console import out
from genfarm.errors import UserError

STORAGE_ENV = "GENFARM_BATCHES_STORAGE"
STORAGE_HELP = f"The serve config's batches.storage (folder or URI); default ${STORAGE_ENV}."
CONFIG_HELP = "A serve config to read batches.storage from."
Storage = Annotated[Optional[str], typer.Option("--storage", help=STORAGE_HELP)]
Config = Annotated[Optional[Path], typer.Option("--config", help=CONFIG_HELP)]

batches_app = typer.Typer(help="The batch API's batches (/v1/batches) of every key: list, status, cancel.",
                          no_args_is_help=True)


def _store(storage: str | None, config: Path | None):
    from genfarm.serve.batch_store import Store

    if storage is None and config is not None:
        from genfarm.serve.config import load_serve_config

        storage = load_serve_config(config).batches.storage
    storage = storage or os.environ.get(STORAGE_ENV)
    if not storage:
        raise UserError("--storage", "no batch storage given", f"pass --storage PATH, --config serve.yaml or set "
                        f"${STORAGE_ENV}")
    return Store(storage)


def _batch(batch_id: str, storage: str | None, config: Path | None):
    """(store, record) of a batch of any key."""
    from genfarm.serve.responses import APIError

    store = _store(storage, config)
    try:
        return store, store.batch(batch_id)
    except APIError:
        raise UserError("BATCH_ID", f"no batch {batch_id} in {store.uri}", "see: genfarm batches list") from None


@batches_app.command("list")
def batches_list(storage: Storage = None, config: Config = None,
                 as_json: bool = typer.Option(False, "--json", help="Print JSON for machines.")) -> None:
    """Every batch, newest first: status, requests done, its key (digest) and endpoint."""
    store = _store(storage, config)
    batches = [{**store.view(b), "owner": b["_owner"]} for b in store.batches()]
    if as_json:
        print(json.dumps(batches, indent=2))
        return
    # ids are copied into other commands: never cut
    view = Table(Column("batch id", no_wrap=True, min_width=30), "status", "requests", "created", "key", "endpoint")
    for b in batches:
        counts = b["request_counts"]
        view.add_row(b["id"], b["status"], f"{counts['completed']}+{counts['failed']} of {counts['total']}",
                     f"{datetime.fromtimestamp(b['created_at']):%m-%d %H:%M}", b["owner"][7:15] or "-",
                     b["endpoint"].removeprefix("/v1/"))
    out.print(view)


@batches_app.command("status")
def batches_status(batch_id: str, storage: Storage = None, config: Config = None) -> None:
    """One batch as the API shows it to its key (JSON), with its job folder."""
    store, record = _batch(batch_id, storage, config)
    print(json.dumps({**store.view(record), "owner": record["_owner"], "job": store.job_output(batch_id)}, indent=2))


@batches_app.command("cancel")
def batches_cancel(batch_id: str, storage: Storage = None, config: Config = None) -> None:
    """Cancel a batch of any key: its runner stops the job and writes what finished."""
    from genfarm.serve.batch_store import FINAL

    store, record = _batch(batch_id, storage, config)
    if record["status"] in FINAL:
        raise UserError("BATCH_ID", f"{batch_id} is {record['status']} already", "nothing to cancel")
    store.request_cancel(batch_id)
    out.print(f"{batch_id} is cancelling: its runner stops the job within seconds while the service runs (or when "
              "it starts again), and its files keep the requests that finished")
