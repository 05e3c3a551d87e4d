"""A two-namespace world for networking tests and benchmarks, never the machine's own namespace.

``host`` is where micropod runs (its bridge, TAPs and nftables tables live there); ``outside`` plays
the internet, one veth away: host 192.0.2.1/24 <-> outside 192.0.2.2/24 (TEST-NET-1). The outside
has no route to the VM subnet, so anything a guest reaches there went through NAT. The outside also
holds the cloud's metadata address (169.254.169.254), routed to from the host as a cloud's would be.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass

HOST_IP = "192.0.2.1"
OUTSIDE_IP = "192.0.2.2"
METADATA_IP = "169.254.169.254"
CLONE_NEWNET = 0x40000000
_serial = itertools.count()


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")


@dataclass
class Topology:
    host: str
    outside: str

    def argv(self, netns: str, *command: str) -> list[str]:
        return ["ip", "netns", "exec", netns, *command]

    def run(self, netns: str, *command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(netns, *command), capture_output=True, text=True, timeout=timeout)

    def spawn(self, netns: str, *command: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(netns, *command), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)


def connect_in(netns: str, address: tuple[str, int], timeout: float = 30.0) -> socket.socket:
    """A TCP connection from inside ``netns``, for a test that itself runs in the machine's namespace: a socket
    belongs to the namespace it was made in, so a short-lived thread enters it (setns is per thread) to make one."""
    from micropod import syscalls

    made: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            with open(f"/run/netns/{netns}", "rb") as handle:
                syscalls.setns(handle.fileno(), CLONE_NEWNET)
            made.append(socket.create_connection(address, timeout=timeout))
        except BaseException as exc:  # handed to the caller's thread
            made.append(exc)

    thread = threading.Thread(target=make, daemon=True)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def _kill_everything_in(netns: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)


@contextlib.contextmanager
def topology() -> Iterator[Topology]:
    """Create both namespaces and their link; on exit, kill what runs in them and delete them."""
    tag = f"{os.getpid() % 100000}-{next(_serial)}"
    topo = Topology(host=f"mp-host-{tag}", outside=f"mp-out-{tag}")
    made: list[str] = []
    try:
        for netns in (topo.host, topo.outside):
            _ip("netns", "add", netns)
            made.append(netns)
            _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", topo.host, "link", "add", "uplink0", "type", "veth", "peer", "name", "eth0", "netns", topo.outside)
        _ip("-n", topo.host, "addr", "add", f"{HOST_IP}/24", "dev", "uplink0")
        _ip("-n", topo.outside, "addr", "add", f"{OUTSIDE_IP}/24", "dev", "eth0")
        _ip("-n", topo.host, "link", "set", "uplink0", "up")
        _ip("-n", topo.outside, "link", "set", "eth0", "up")
        _ip("-n", topo.outside, "addr", "add", f"{METADATA_IP}/32", "dev", "eth0")
        _ip("-n", topo.host, "route", "add", f"{METADATA_IP}/32", "via", OUTSIDE_IP)
        yield topo
    finally:
        for netns in made:
            _kill_everything_in(netns)
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
