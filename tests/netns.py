"""Machines that are really apart, on one host: Linux network namespaces on a bridge of their own.

`network(n)` makes a bridge with the host's address on it (198.18.X.1/24, from the 198.18.0.0/15 benchmarking
range, a /24 no interface here uses yet) and n namespaces, each with a veth into the bridge and its own address
(198.18.X.2, .3, ...), only a route to that /24 and loopback: a namespace reaches the other namespaces and the host
side of the bridge, nothing else; in it, this machine's name resolves to the namespace's own address.
`Network.popen(i, argv)` runs a command inside namespace i (`ip netns exec`),
optionally with a /tmp of its own (a tmpfs in the command's mount namespace), so that nothing can assume another
node's /tmp. On leaving, every process inside the namespaces is killed and the namespaces, veths and bridge are
deleted, also after a failure. Needs root (CAP_NET_ADMIN); `unavailable()` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

RANGE = ipaddress.ip_network("198.18.0.0/15")
ETC_NETNS = "/etc/netns"  # per-namespace files that `ip netns exec` mounts over /etc


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (None: they can): tried once with a throwaway namespace."""
    name = f"gfprobe{os.getpid()}"
    try:
        made = ip("netns", "add", name, check=False)
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    if made.returncode != 0:
        return f"`ip netns add` is refused here ({made.stderr.strip() or 'no reason given'}): needs root"
    ip("netns", "del", name, check=False)
    return None


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 of 198.18.0.0/15 that no interface of this host has an address in (another run may hold one)."""
    used = set()
    for line in ip("-o", "-4", "addr", "show").stdout.splitlines():
        address = ipaddress.ip_interface(line.split()[3])
        if address.ip in RANGE:
            used.add(address.network.supernet(new_prefix=24) if address.network.prefixlen > 24 else address.network)
    start = os.getpid() % 500  # where concurrent runs start looking differs, so they rarely race for one
    subnets = list(RANGE.subnets(new_prefix=24))
    for subnet in subnets[start:] + subnets[:start]:
        if not any(subnet.overlaps(other) for other in used):
            return subnet
    raise RuntimeError("every /24 of 198.18.0.0/15 is in use on this host")


@dataclass
class Network:
    tag: str  # short and unique: interface names have at most 15 characters
    subnet: ipaddress.IPv4Network
    size: int
    namespaces: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"gfb{self.tag}"

    @property
    def host_ip(self) -> str:
        """The host's address on the bridge: what the namespaces reach the host at."""
        return str(self.subnet[1])

    def node_ip(self, index: int) -> str:
        return str(self.subnet[index + 2])

    def create(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for index in range(self.size):
            name, host_end, node_end = f"gf{self.tag}n{index}", f"gfh{self.tag}{index}", f"gfn{self.tag}{index}"
            ip("netns", "add", name)
            self.namespaces.append(name)
            ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
            ip("link", "set", node_end, "netns", name)
            ip("link", "set", host_end, "master", self.bridge)
            ip("link", "set", host_end, "up")
            ip("-n", name, "addr", "add", f"{self.node_ip(index)}/24", "dev", node_end)
            ip("-n", name, "link", "set", node_end, "up")
            ip("-n", name, "link", "set", "lo", "up")
            # `ip netns exec` puts /etc/netns/NAME/hosts over /etc/hosts: this machine's name resolves to the node's own
            # address there, as on a machine of its own (here it is 127.0.0.1, which Ray falls back to when it cannot
            # find its address by a route to the internet, which a namespace has not).
            etc = Path(ETC_NETNS, name)
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{self.node_ip(index)} {socket.gethostname()}\n")

    def command(self, index: int, argv: list[str], private_tmp: bool = False) -> list[str]:
        """`argv` as run inside namespace `index`; with private_tmp, under a /tmp of its own."""
        inside = ["ip", "netns", "exec", self.namespaces[index]]
        if private_tmp:  # `ip netns exec` gives the command a mount namespace: the tmpfs is seen by it alone
            return [*inside, "sh", "-c", 'mount -t tmpfs -o mode=1777 gftmp /tmp && exec "$@"', "sh", *argv]
        return [*inside, *argv]

    def popen(self, index: int, argv: list[str], private_tmp: bool = False, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(index, argv, private_tmp), **kwargs)

    def pids(self, index: int) -> list[int]:
        """Every process in namespace `index` (all that a command run there started, however deep)."""
        listed = ip("netns", "pids", self.namespaces[index], check=False).stdout.split()
        return [int(pid) for pid in listed if pid.isdigit()]

    def kill(self, index: int, timeout: float = 10) -> None:
        """SIGKILL every process in namespace `index`, like pulling a machine's power, and wait until they are gone."""
        deadline = time.monotonic() + timeout
        while (pids := self.pids(index)) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def destroy(self) -> None:
        """Kill what runs inside, then delete namespaces (their veth ends go with them), host veths and the bridge;
        each step runs even when an earlier one failed."""
        for index in range(len(self.namespaces)):
            self.kill(index)
        for index, name in enumerate(self.namespaces):
            ip("netns", "del", name, check=False)
            ip("link", "del", f"gfh{self.tag}{index}", check=False)
            shutil.rmtree(Path(ETC_NETNS, name), ignore_errors=True)
        ip("link", "del", self.bridge, check=False)
        with contextlib.suppress(OSError):
            os.rmdir(ETC_NETNS)  # only when no other namespace has files there


@contextmanager
def network(size: int) -> Iterator[Network]:
    net = Network(tag=f"{os.getpid() % 100000:05d}", subnet=free_subnet(), size=size)
    try:
        net.create()
        yield net
    finally:
        net.destroy()


def leftovers(tag: str) -> list[str]:
    """Namespaces and links of a network that should be gone (for tests of the clean-up itself)."""
    names = ip("netns", "list").stdout.split() + ip("-o", "link", "show").stdout.split()
    return [name.rstrip(":").split("@")[0] for name in names if tag in name]
