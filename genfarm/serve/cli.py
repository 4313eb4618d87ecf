"""`genfarm serve`: start the online service, see its replicas, scale it, stop it."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from genfarm import reaper
from genfarm.console import ADDRESS_HELP, err, out
from genfarm.errors import UserError

NAME_HELP = "Serve application name (the serve config's `name`)."


class StartByDefault(TyperGroup):
    """`genfarm serve [CONFIG]` means `genfarm serve start [CONFIG]`; status/scale/shutdown are subcommands."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["start", *args]
        return super().parse_args(ctx, args)


serve_app = typer.Typer(
    cls=StartByDefault,
    help="The online service: OpenAI-compatible and task endpoints on Ray Serve. "
    "`genfarm serve [CONFIG]` starts it; `status`, `scale`, `shutdown` operate it.",
)


@serve_app.command()
def start(
    config: Optional[Path] = typer.Argument(None, help="Serve config (YAML), e.g. examples/serve.yaml; "
                                            "default: the embedded model with default settings."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field, e.g. --set replicas.count=2."),
    host: Optional[str] = typer.Option(None, "--host", help="Listen address (config http.host; default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="HTTP port (config http.port; default 8000)."),
    address: Optional[str] = typer.Option(None, "--address", help="Deploy to this running cluster's dashboard and "
                                          "return; without it, a local Ray runs until Ctrl-C."),
) -> None:
    """Start the service. Locally it runs in the foreground until Ctrl-C; with --address it is deployed to the
    cluster and keeps running there (stop it with `genfarm serve shutdown`)."""
    from genfarm.serve import deploy
    from genfarm.serve.config import load_serve_config

    overrides = [*set_, *([f"http.host={host}"] if host else []), *([f"http.port={port}"] if port else [])]
    spec = load_serve_config(config, overrides)
    if address:
        deploy.deploy(spec, address)
        deploy.wait_until_running(address, spec.name, on_change=_say_status)
        _say_ready(spec, address)
        return
    if not deploy.is_host():
        # The front: Ray and the replicas run in a process of their own (see deploy.LocalService), this one stays
        # in the foreground, passes a stop on and makes sure nothing of the service outlives it.
        command = [sys.executable, "-m", "genfarm", "serve", "start", *([str(config)] if config else []),
                   *(arg for item in set_ for arg in ("--set", item)),
                   *(["--host", host] if host else []), *(["--port", str(port)] if port else [])]
        raise typer.Exit(deploy.run_local(command, spec))
    reaper.signal_on_parent_death(signal.SIGTERM)  # stop with the front, however it goes
    if not deploy.is_host():
        return  # the front went before the signal was set
    try:
        with deploy.local_cluster(spec) as local_address:
            # After Ray's own handlers: the front's SIGTERM stops it cleanly.
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                deploy.deploy(spec, local_address)
                deploy.wait_until_running(local_address, spec.name, on_change=_say_status)
                _say_ready(spec, local_address)
                out.print("Ctrl-C stops the service.")
                signal.pause()
            finally:
                # A second `kill` must not cut the shutdown short (the front kills what is left after a while).
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                err.print("stopping: replicas and their engines shut down first")
    except KeyboardInterrupt:
        err.print("stopped")


def _say_status(status: str | None) -> None:
    err.print(f"serve app: {status or 'starting Serve'}")


def _say_ready(spec, address: str) -> None:
    url = f"http://{'127.0.0.1' if spec.http.host == '0.0.0.0' else spec.http.host}:{spec.http.port}"
    out.print(f"genfarm serves {spec.model.name} at {url}/v1 (API docs: {url}/docs, metrics: {url}/metrics)\n"
              f"operate it: genfarm serve status --address {address}   "
              f"genfarm serve scale --replicas N --address {address}")


@serve_app.command()
def status(
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    name: str = typer.Option("genfarm", "--name", help=NAME_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
) -> None:
    """The service's state and its replicas: state, node and process of each."""
    from rich.table import Column, Table

    from genfarm.cluster import address_or_default
    from genfarm.serve import deploy

    state = deploy.status(address_or_default(address), name)
    if as_json:
        print(json.dumps(state, indent=2))
        return
    out.print(f"{state['name']}: {state['status']}  target: {json.dumps(state['target'])}")
    if state["message"]:
        out.print(state["message"])
    view = Table(Column("replica", no_wrap=True), "state", Column("node", no_wrap=True), "ip", "pid")
    for r in state["replicas"]:
        view.add_row(r["replica_id"], r["state"], (r["node_id"] or "")[:12], r["node_ip"], str(r["pid"]))
    out.print(view)


@serve_app.command()
def scale(
    replicas: Optional[int] = typer.Option(None, "--replicas", min=1, help="A fixed number of replicas."),
    min_: Optional[int] = typer.Option(None, "--min", min=1, help="Autoscale between --min and --max replicas."),
    max_: Optional[int] = typer.Option(None, "--max", min=1),
    target: float = typer.Option(16, "--target-ongoing-requests", help="With --min/--max: requests per replica "
                                 "autoscaling aims at."),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    name: str = typer.Option("genfarm", "--name", help=NAME_HELP),
) -> None:
    """Change the number of replicas (or the autoscaling range) of the running service, in place."""
    from genfarm.cluster import address_or_default
    from genfarm.serve import deploy
    from genfarm.serve.config import ReplicasSpec
    from genfarm.spec import validate

    if replicas is None and min_ is None and max_ is None:
        raise UserError("serve scale", "nothing to change", "pass --replicas N, or --min A --max B")
    if replicas is not None and (min_ is not None or max_ is not None):
        raise UserError("serve scale", "--replicas and --min/--max exclude each other", "pass one of them")
    wanted = validate(ReplicasSpec, {"count": replicas, "min": min_, "max": max_,
                                     "target_ongoing_requests": target}, source="serve scale")
    deploy.scale(address_or_default(address), name, wanted)
    out.print(f"scaling {name}: {json.dumps(deploy.replica_options(wanted))}; follow it with genfarm serve status")


@serve_app.command()
def shutdown(
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    name: str = typer.Option("genfarm", "--name", help=NAME_HELP),
) -> None:
    """Stop the service and free its engines."""
    from genfarm.cluster import address_or_default
    from genfarm.serve import deploy

    deploy.shutdown(address_or_default(address), name)
    out.print(f"{name} is shutting down")
