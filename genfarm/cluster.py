"""Operating a running Ray cluster: submit genfarm jobs through Ray's Jobs API, follow them, see what runs where.
(The settings of the Ray genfarm starts for itself on one machine are in genfarm/local_ray.py.)"""

from __future__ import annotations

import glob
import importlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from genfarm import console
from genfarm.errors import UserError
from genfarm.spec import apply_overrides, load_job
from genfarm.storage import glob_base, is_uri

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
AGENT_WAIT_S = 60

def address_or_default(address: str | None) -> str:
    return address or os.environ.get("GENFARM_CLUSTER") or DEFAULT_ADDRESS


def send_saved_token() -> None:
    """Ray clusters check a token (saved in ~/.ray/auth_token by `ray start` and `ray.init`), but clients send it
    only with RAY_AUTH_MODE=token: send it whenever this machine has one, as the `ray` CLI does."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    saved = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    if os.environ.get("RAY_AUTH_TOKEN") or saved.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def dashboard_client(address: str, client: str):
    """A client of the Ray dashboard at `address`; `client` names its class as `module:Class`."""
    send_saved_token()  # before Ray is imported: its token loader reads the mode once
    module, _, name = client.partition(":")
    try:
        return getattr(importlib.import_module(module), name)(address)
    except Exception as err:  # noqa: BLE001 - connection problems are the user's to fix
        raise unreachable(address, err) from None


def job_client(address: str):
    return dashboard_client(address, "ray.job_submission:JobSubmissionClient")


def unreachable(address: str, err: Exception) -> UserError:
    return UserError("--address", f"no Ray dashboard answers at {address} ({type(err).__name__})",
                     "start the cluster (cluster/local-cluster.sh start) or pass --address http://HEAD:8265")


def package_job(job_file: str, overrides: list[str]) -> tuple[Path, str]:
    """A folder with the job file and its local input, shipped as the job's working_dir: (folder, entrypoint).
    The entrypoint is a shell command on the head, with the PATH its Ray was started with: `python3 -m genfarm`
    needs genfarm's interpreter on it (Ray's images have theirs; cluster/local-cluster.sh puts its venv's first),
    not also a `genfarm` script, which `pip install --user` for one leaves in ~/.local/bin."""
    job = load_job(job_file, overrides)  # validate here: a bad job file fails before anything is shipped
    data = apply_overrides(yaml.safe_load(Path(job_file).read_text()) or {}, list(overrides))
    if "://" not in job.output.path and not Path(job.output.path).is_absolute():
        raise UserError("output.path", f"{job.output.path} is relative: it would land in the job's temporary "
                        "folder on the cluster", "use an absolute path on storage the cluster shares, or s3://...")
    folder = Path(tempfile.mkdtemp(prefix="genfarm-submit-"))
    (folder / "input").mkdir()
    # The task as loaded: files it names (task.policy, task.schema) are read into it here, not looked for there.
    data["task"] = job.task.model_dump(mode="json")
    source = Path(job.input.path)
    if "://" not in job.input.path and any(ch in job.input.path for ch in "*?["):
        data["input"]["path"] = ship_glob(job.input.path, folder / "input")
    elif "://" not in job.input.path:
        if not source.exists():
            raise UserError("input.path", f"{source} does not exist", "check the path or pass --set input.path=...")
        target = folder / "input" / source.name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
        data["input"]["path"] = f"input/{source.name}"
    (folder / "job.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder, "python3 -m genfarm run job.yaml --no-progress"


def ship_glob(pattern: str, target: Path) -> str:
    """Copy the files a local glob matches under `target`, by their path below the glob's fixed part (as the rows'
    ids name them), and return the same glob there."""
    pattern = os.path.abspath(pattern)
    base = glob_base(pattern)
    matches = [m for m in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(m)]
    if not matches:
        raise UserError("input.path", f"no files match {pattern}", "check the glob, e.g. data/**/*.jsonl")
    for match in matches:
        copy = target / os.path.relpath(match, base)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(match, copy)
    return f"{target.name}/{pattern[len(base) + 1:]}"


def submit(job_file: str, overrides: list[str], address: str) -> str:
    send_saved_token()  # first: Ray's token loader reads the mode once, and a job file's plugins may import Ray
    folder, entrypoint = package_job(job_file, overrides)
    client = job_client(address)
    warning = local_output_warning(yaml.safe_load((folder / "job.yaml").read_text())["output"]["path"], address)
    if warning:
        console.err.print(f"warning: {warning}", highlight=False)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(folder)})
        except RuntimeError as err:
            # A head that just started answers before its job agent is up; that passes within seconds.
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def local_output_warning(output: str, address: str) -> str | None:
    """What to tell someone who sends a local output.path to a cluster of several nodes: every node's engines
    commit their parts to that path on their own disk, and the driver on the head sees only its own."""
    if is_uri(output):
        return None
    try:
        from ray.util.state import list_nodes

        nodes = len(list_nodes(address=address, filters=[("state", "=", "ALIVE")]))
    except Exception:  # noqa: BLE001 - an unreachable cluster is reported by the submission itself
        return None
    if nodes < 2:
        return None
    return (f"output.path {output} is a local path, and the cluster has {nodes} nodes: unless every node mounts it "
            "as one shared filesystem, each node's engines write their parts to their own disk and the job never "
            "sees them all. Use object storage (s3://BUCKET/PREFIX) or a shared filesystem")


def jobs(address: str) -> list[dict]:
    return [
        {"job_id": j.submission_id, "status": str(j.status.value), "entrypoint": j.entrypoint,
         "message": j.message or ""}
        for j in job_client(address).list_jobs() if j.submission_id
    ]


def job_status(address: str, job_id: str) -> str:
    try:
        return str(job_client(address).get_job_status(job_id).value)
    except RuntimeError:
        raise UserError("JOB_ID", f"no job {job_id} on {address}", "see: genfarm jobs list") from None


def job_logs(address: str, job_id: str) -> str:
    job_status(address, job_id)
    return job_client(address).get_job_logs(job_id)


def stop_job(address: str, job_id: str) -> bool:
    job_status(address, job_id)
    return job_client(address).stop_job(job_id)


def cluster_status(address: str) -> dict:
    """Nodes with their resources, the genfarm engine actors and Serve replicas on each, and the jobs."""
    send_saved_token()
    from ray.util.state import list_actors, list_nodes

    try:
        nodes = list_nodes(address=address, detail=True)
        actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True, limit=10_000)
    except Exception as err:  # noqa: BLE001 - connection problems are the user's to fix
        raise unreachable(address, err) from None
    by_node: dict[str, list[str]] = {}
    for actor in actors:
        name = actor.class_name or ""
        if "GenerateWorker" in name or ("ServeReplica" in name and "MetricsHub" not in name):
            kind = "engine" if "GenerateWorker" in name else "serve-replica"
            by_node.setdefault(actor.node_id, []).append(kind)
    return {
        "nodes": [
            {"node_id": n.node_id, "ip": n.node_ip, "state": n.state, "head": n.is_head_node,
             "cpus": n.resources_total.get("CPU", 0), "gpus": n.resources_total.get("GPU", 0),
             "memory_gib": round(n.resources_total.get("memory", 0) / 2**30, 1),
             "engines": by_node.get(n.node_id, []).count("engine"),
             "serve_replicas": by_node.get(n.node_id, []).count("serve-replica")}
            for n in nodes
        ],
        "jobs": [j for j in jobs(address) if j["status"] in ("PENDING", "RUNNING")],
    }
