"""Stopping `genfarm serve` for real: a local service (Ray, Serve's HAProxy, a replica with vLLM's engine on the tiny
model) stops within 15 s of SIGTERM to its process group (systemd's stop) or Ctrl-C, prints no GCS error, leaves no
process behind and frees its port at once; a service killed outright is cleared by the next start on the same port."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from genfarm.serve.deploy import free_ports

STOP_S = 15
# Up to four services start one after another in a test, each a few minutes on a busy 2-core machine.
pytestmark = pytest.mark.timeout(2400)


class Service:
    """A `genfarm serve` in a process group of its own, as a shell's job or a systemd unit runs it."""

    def __init__(self, config: Path, port: int, log: Path):
        self.port, self.log = port, log
        self.proc = subprocess.Popen([sys.executable, "-m", "genfarm", "serve", str(config), "--port", str(port)],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 400
        while "Ctrl-C stops" not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"genfarm serve did not come up:\n{self.output()[-3000:]}")
            time.sleep(1)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
        [self.host] = psutil.Process(self.proc.pid).children()
        self.processes, self.session_dir = self.family()

    def output(self) -> str:
        return self.log.read_text()

    def family(self) -> tuple[list[psutil.Process], str]:
        """Every process of the service now (the command's descendants and the members of its Ray host's session:
        daemons, actors, HAProxy, engines), and its Ray session folder."""
        front = psutil.Process(self.proc.pid)
        tree = front.children(recursive=True)
        session = []
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) == self.host.pid:
                    session.append(process)
            except OSError:
                pass
        processes = {p.pid: p for p in [front, *tree, *session]}
        names = {name(p) for p in processes.values()}
        assert {"raylet", "gcs_server", "haproxy"} <= names, names
        gcs = next(p for p in processes.values() if name(p) == "gcs_server")
        session_dir = re.search(r"(/\S+/session_[^/\s]+)", " ".join(gcs.cmdline())).group(1)
        return list(processes.values()), session_dir

    def stop(self, sig: int, to: str = "pid") -> float:
        """Send `sig` to the pid, its process group ("group") or every process of the service ("all", as systemd
        does); seconds until `genfarm serve` exited."""
        start = time.monotonic()
        if to == "all":
            for process in self.processes:
                try:
                    process.send_signal(sig)
                except psutil.Error:
                    pass
        else:
            (os.killpg if to == "group" else os.kill)(self.proc.pid, sig)
        try:
            code = self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"genfarm serve still runs 90 s after {signal.Signals(sig).name}")
        took = time.monotonic() - start
        print(f"{signal.Signals(sig).name} to {'all its processes' if to == 'all' else 'the ' + to}: "
              f"exited {code} after {took:.1f}s")
        assert code == 0, self.output()[-3000:]
        return took

    def leftovers(self) -> list[str]:
        """What of the service still runs: one of its processes, or one whose command names its Ray session."""
        left = [p for p in self.processes if alive(p)]
        for process in psutil.process_iter():
            try:
                if self.session_dir in " ".join(process.cmdline()) and alive(process):
                    left.append(process)
            except psutil.Error:
                pass
        return sorted({f"{p.pid} {name(p)}" for p in left})


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return "?"


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def assert_stopped_clean(service: Service, took: float) -> None:
    assert took < STOP_S, service.output()[-3000:]
    assert port_free(service.port)
    assert service.leftovers() == []
    text = service.output()
    assert "GCS" not in text and "Traceback" not in text, text[-3000:]
    if "takes too long" in text:  # a loaded machine: the graceful part ran out of time, the rest was killed
        print("the graceful stop ran out of time")


class Services:
    def __init__(self):
        self.started: list[Service] = []

    def start(self, config: Path, port: int, log: Path) -> Service:
        self.started.append(Service(config, port, log))
        return self.started[-1]


@pytest.fixture
def services():
    """Starts services; whatever of them a failed test left running is killed (these processes only)."""
    started = Services()
    yield started
    for service in started.started:
        left = [p for p in service.processes if alive(p)]
        for process in left:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=10)


@pytest.fixture(scope="module")
def config(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lifecycle") / "serve.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": tiny},
        "engine": {"max_model_len": 2048, "max_num_seqs": 8, "kv_cache_gib": 0.25},
        "sampling": {"max_tokens": 8},
    }))
    return path


def test_sigterm_to_the_process_group_or_ctrl_c_stops_everything(config, tmp_path, services):
    """systemd stops a unit by signalling all its processes; a shell's job control signals the process group. Ray's
    daemons must not die under the service's own shutdown (that was a 60 s wait for the GCS and an orphaned HAProxy
    holding the port), and the same command starts again at once."""
    port = free_ports(1)[0]
    first = services.start(config, port, tmp_path / "first.log")
    assert_stopped_clean(first, first.stop(signal.SIGTERM, to="group"))

    again = services.start(config, port, tmp_path / "again.log")  # the same command, the same port, right away
    assert f"genfarm serve (pid {first.proc.pid}," not in again.output()  # the first left nothing to clear
    assert_stopped_clean(again, again.stop(signal.SIGINT))  # Ctrl-C


def test_a_killed_service_is_cleared_by_the_next_start(config, tmp_path, services):
    """`genfarm serve` killed outright (SIGKILL: no chance to stop anything) takes its service down with it; whatever
    a kill leaves (the command gone and its Ray host hung, or both killed as the OOM killer would), the next start on
    the same port finds it, stops it and starts."""
    port = free_ports(1)[0]
    killed = services.start(config, port, tmp_path / "killed.log")
    killed.proc.kill()
    killed.proc.wait()
    second = services.start(config, port, tmp_path / "second.log")  # at once: the killed one's host is stopping
    assert killed.leftovers() == []

    # The command killed while its Ray host hangs (stopped): the whole service stays up, HAProxy on the port.
    os.kill(second.host.pid, signal.SIGSTOP)
    second.proc.kill()
    second.proc.wait()
    assert not port_free(port)
    third = services.start(config, port, tmp_path / "third.log")
    [cleared] = [line for line in third.output().splitlines() if "left running" in line]
    assert f"pid {second.proc.pid}" in cleared and "haproxy" in cleared and "raylet" in cleared, cleared
    assert second.leftovers() == []

    # The command and its Ray host both killed: Ray's daemons go with the host, its actors and agents linger.
    third.proc.kill()
    third.host.kill()
    third.proc.wait()
    fourth = services.start(config, port, tmp_path / "fourth.log")
    assert third.leftovers() == []
    # systemd's default stop (KillMode=control-group): SIGTERM to every process of the service at once.
    assert_stopped_clean(fourth, fourth.stop(signal.SIGTERM, to="all"))


def test_a_port_held_by_another_process_is_a_one_line_error():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "genfarm", "serve", "--port", str(port)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port} is not free" in lines[0], result.stderr
    assert f"pid {os.getpid()}" in lines[0] and f"kill {os.getpid()}" in lines[0]
