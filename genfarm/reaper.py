"""`python -m genfarm.reaper PARENT PID...`: kill the PIDs once PARENT is gone, however it went.

vLLM's async engine runs in child processes that outlive their parent when Ray kills a replica's process hard
(SIGKILL, a lost node, a stopped raylet): they would keep gigabytes of memory and spin on CPU. A process cannot
watch its own death, so a tiny process in its own session does it.

Also the helpers a local `genfarm serve` uses to find every process it started (its session, or the mark in their
environment) and to kill what is left of them.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil

POLL_S = 1.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # gone between the two questions
        return False


def main(parent_pid: int, pids: list[int]) -> None:
    try:
        parent = psutil.Process(parent_pid)
    except psutil.NoSuchProcess:
        parent = None
    # Process objects remember their start time, so a reused PID is never mistaken for ours.
    children = []
    for pid in pids:
        try:
            children.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    while parent is not None and alive(parent) and any(alive(c) for c in children):
        time.sleep(POLL_S)
    for child in children:
        try:
            if alive(child):
                child.kill()
        except psutil.NoSuchProcess:
            pass


def same_process(pid: int, started: float) -> psutil.Process | None:
    """The process `pid` if it is still the one that started at `started` (a PID the OS reused is not)."""
    try:
        process = psutil.Process(pid)
        return process if alive(process) and abs(process.create_time() - started) < 1 else None
    except psutil.Error:
        return None


def signal_on_parent_death(sig: int = signal.SIGTERM) -> None:
    """Linux: the kernel sends `sig` to this process when its parent exits, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def family(session: int, started: float, mark: tuple[str, str]) -> list[psutil.Process]:
    """Live processes of session `session` (whose leader started at `started`) and those whose environment
    carries `mark` (name, value; none if value is empty): processes that left the session keep their environment.
    Not this process."""
    name, value = mark
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid() or not alive(process):
            continue
        try:
            # A session outlives its leader while members remain; its id is not reused until they are all gone.
            # (A second of slack: create times derive from the boot time, which the clock's adjustments move.)
            if os.getsid(process.pid) == session and process.create_time() >= started - 1:
                found.append(process)
            elif value and process.environ().get(name) == value:
                found.append(process)
        except (psutil.Error, OSError):  # gone meanwhile, or not ours to read
            continue
    return found


def kill_all(processes: list[psutil.Process], timeout_s: float = 5) -> list[psutil.Process]:
    """SIGKILL each process and wait for them to go (a zombie is gone: it holds no port and no memory); the ones
    still alive after `timeout_s`."""
    return _signal_and_wait(processes, psutil.Process.kill, timeout_s)


def stop_all(processes: list[psutil.Process], grace_s: float = 1, timeout_s: float = 3) -> list[psutil.Process]:
    """SIGTERM each process, SIGKILL those still running after `grace_s`; the ones alive after `timeout_s` more."""
    return kill_all(_signal_and_wait(processes, psutil.Process.terminate, grace_s), timeout_s)


def _signal_and_wait(processes: list[psutil.Process], send, timeout_s: float) -> list[psutil.Process]:
    """`send(process)` for each (one already gone is skipped), then the ones still alive after `timeout_s`."""
    for process in processes:
        try:
            send(process)
        except psutil.Error:
            pass
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in processes if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


if __name__ == "__main__":
    main(int(sys.argv[1]), [int(pid) for pid in sys.argv[2:]])
