"""`python -m genfarm.reaper PARENT PID...`: kill the PIDs once PARENT is gone, however it went.

vLLM's async engine runs in child processes that outlive their parent when Ray kills a replica's process hard
(SIGKILL, a lost node, a stopped raylet): they would keep gigabytes of memory and spin on CPU. A process cannot
watch its own death, so a tiny process in its own session does it.
"""

from __future__ import annotations

import sys
import time

import psutil

POLL_S = 1.0


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


if __name__ == "__main__":
    main(int(sys.argv[1]), [int(pid) for pid in sys.argv[2:]])
