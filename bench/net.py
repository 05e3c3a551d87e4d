"""Networking: guest-to-host TCP throughput, and the cost of setting up and tearing down one VM's network.

Everything happens in network namespaces made for the purpose (tests/nettopo.py, tests/netns.py), never in
the machine's own.

- ``tcp_throughput``: a guest streams zeros with busybox ``dd | nc`` over its TAP to a receiver on the
  bridge address in the host namespace, against the same bytes sent with the host's busybox ``dd | nc``
  from the outside namespace over the veth to a receiver in the host namespace (the physical reference).
  The receiver times from the first byte to EOF, so connection set-up and ``micropod exec`` are excluded.
- ``setup_teardown``: ``HostNetwork.attach`` + ``detach`` of one VM with one published port, while another
  VM stays attached, against a script doing the same with ``ip tuntap``/``ip link``/``nft -j -f -`` and the
  same ruleset JSON, each in a fresh network namespace.

``python -m bench.net`` prints just this benchmark's JSON; ``python -m bench.net --receive PORT`` is the
receiver that the throughput runs start inside the host namespace.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from micropod.net.nft import VmNetwork

REPO = Path(__file__).resolve().parent.parent
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
ITERATIONS = 20
BLOCK = 64 * 1024
TARGET_SECONDS = 3.0
CALIBRATION_BLOCKS = 256  # 16 MiB
MAX_BLOCKS = 64 * 1024  # 4 GiB
HOST_BUSYBOX = "/bin/busybox"
RECEIVE_PORT = 5201
TIMEOUT = 300.0


def _log(message: str) -> None:
    print(f"bench.net: {message}", file=sys.stderr, flush=True)


def _tail(text: str | bytes | None, lines: int = 15) -> str:
    if not text:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = TIMEOUT,
         input: bytes | None = None) -> str:
    done = subprocess.run(list(argv), env=env, input=input, capture_output=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{_tail(done.stderr)}")
    return done.stdout.decode(errors="replace")


# --- the receiver: one connection, bytes counted from the first one to EOF ---


def receive(port: int, timeout: float = TIMEOUT) -> dict[str, float]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", port))
        listener.listen(1)
        listener.settimeout(timeout)
        print("listening", flush=True)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(timeout)
            buffer = bytearray(1 << 20)
            view = memoryview(buffer)
            first = conn.recv_into(view)
            start = time.perf_counter()
            counted = 0
            while (n := conn.recv_into(view)) > 0:
                counted += n
            elapsed = time.perf_counter() - start
    # The first chunk arrived at `start`: only what came after it counts towards the rate.
    return {"bytes": first + counted, "timed_bytes": counted, "seconds": elapsed}


class Receiver:
    """``python -m bench.net --receive PORT`` in a namespace; ready once it says it is listening."""

    def __init__(self, argv_prefix: Sequence[str], port: int) -> None:
        argv = [*argv_prefix, sys.executable, "-m", "bench.net", "--receive", str(port)]
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self._out = b""
        deadline = time.monotonic() + 30
        assert self.proc.stdout is not None
        while b"listening\n" not in self._out:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None:
                self.kill()
                raise RuntimeError(f"the receiver did not start listening: {self._stderr()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(remaining, 0.5))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                self._out += chunk

    def _stderr(self) -> str:
        try:
            _, err = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            return "(still running)"
        return _tail(err)

    def result(self, timeout: float) -> dict[str, float]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"the receiver saw no EOF within {timeout:.0f}s") from None
        if self.proc.returncode != 0:
            raise RuntimeError(f"the receiver failed ({self.proc.returncode}):\n{_tail(err)}")
        text = (self._out + out).decode().split("listening\n", 1)[1]
        result: dict[str, float] = json.loads(text)
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _transfer(receiver_prefix: Sequence[str], sender: Sequence[str], blocks: int,
              env: Mapping[str, str] | None = None) -> dict[str, float]:
    receiver = Receiver(receiver_prefix, RECEIVE_PORT)
    try:
        _run(sender, env=env)
        result = receiver.result(timeout=60)
    finally:
        receiver.kill()
    if result["bytes"] != blocks * BLOCK:
        raise RuntimeError(f"the receiver got {result['bytes']} bytes, {blocks * BLOCK} were sent")
    return result


def _mbps(result: Mapping[str, float]) -> float:
    return result["timed_bytes"] / result["seconds"] / 1e6


def _sender_script(dd: str, nc: str, address: str, blocks: int) -> str:
    return f"{dd} if=/dev/zero bs={BLOCK} count={blocks} 2>/dev/null | {nc} {address} {RECEIVE_PORT}"


def tcp_throughput() -> dict[str, Any]:
    from micropod.image.demo import build_demo_image
    from micropod.net.config import NetworkConfig
    from tests.nettopo import HOST_IP, topology

    gateway = str(NetworkConfig.parse().gateway)
    with tempfile.TemporaryDirectory(prefix="micropod-bench-net-") as tmp, topology() as topo:
        env = dict(os.environ, MICROPOD_ROOT=str(Path(tmp) / "root"), MICROPOD_SNAPSHOT_DIR=str(Path(tmp) / "snap"))
        env.pop("MICROPOD_NETWORK", None)  # bridge networking, the default
        env.pop("MICROPOD_DEBUG", None)
        in_host = topo.argv(topo.host)
        cli = [*in_host, sys.executable, "-m", "micropod"]
        archive = build_demo_image(Path(tmp) / "hello.oci.tar")
        _run([*cli, "load", "-q", "-i", str(archive)], env)
        _log("starting the guest")
        _run([*cli, "run", "-d", "--name", "bench-net", "hello", "sleep", "3600"], env)
        try:
            def guest(blocks: int) -> dict[str, float]:
                script = _sender_script("dd", "nc", gateway, blocks)
                return _transfer(in_host, [*cli, "exec", "bench-net", "sh", "-c", script], blocks, env)

            def veth(blocks: int) -> dict[str, float]:
                script = _sender_script(f"{HOST_BUSYBOX} dd", f"{HOST_BUSYBOX} nc", HOST_IP, blocks)
                return _transfer(in_host, topo.argv(topo.outside, "sh", "-c", script), blocks)

            calibration = _mbps(guest(CALIBRATION_BLOCKS))
            blocks = max(CALIBRATION_BLOCKS, min(MAX_BLOCKS, int(calibration * 1e6 * TARGET_SECONDS / BLOCK)))
            _log(f"guest calibration: {calibration:.1f} MB/s; sending {blocks * BLOCK / 1e6:.0f} MB per run")
            guest_samples = [_mbps(guest(blocks)) for _ in range(RUNS)]
            veth_samples = [_mbps(veth(blocks)) for _ in range(RUNS)]
        finally:
            subprocess.run([*cli, "rm", "-f", "bench-net"], env=env, capture_output=True, timeout=120)
    guest_mbps, veth_mbps = statistics.median(guest_samples), statistics.median(veth_samples)
    return {
        "runs": RUNS,
        "bytes": blocks * BLOCK,
        "guest_to_host_MBps": round(guest_mbps, 1),
        "veth_MBps": round(veth_mbps, 1),
        "ratio": round(guest_mbps / veth_mbps, 4),
        "samples": {
            "guest_to_host_MBps": [round(s, 1) for s in guest_samples],
            "veth_MBps": [round(s, 1) for s in veth_samples],
        },
    }


# --- set-up and teardown of one VM's networking ---


def _vm(index: int) -> VmNetwork:
    from micropod.net.addressing import mac_for, tap_name
    from micropod.net.config import NetworkConfig
    from micropod.net.nft import VmNetwork
    from micropod.net.ports import PortMapping

    vm_id = hashlib.sha256(f"bench-net-{index}".encode()).hexdigest()
    ip = NetworkConfig.parse().gateway + 1 + index
    return VmNetwork(vm_id, tap_name(vm_id), mac_for(vm_id), ip, (PortMapping(8080 + index, 80),))


def _micropod_cycles(state: str, iterations: int) -> list[float]:
    """In a fresh namespace: the product's attach + detach, with one other VM attached throughout."""
    from micropod.net.config import NetworkConfig
    from micropod.net.host import HostNetwork
    from micropod.paths import StateRoot

    host = HostNetwork(StateRoot(Path(state)).ensure(), NetworkConfig.parse())
    try:
        resident = _vm(0)
        host.attach(resident)  # creates the bridge too
        samples = []
        for i in range(iterations + 1):  # the first cycle is a warm-up
            vm = _vm(1 + i)
            start = time.perf_counter()
            host.attach(vm)
            host.detach(vm.vm_id)
            samples.append(time.perf_counter() - start)
        host.detach(resident.vm_id)
    finally:
        host.close()
    return samples[1:]


def _shell_cycles(iterations: int) -> list[float]:
    """In a fresh namespace: what a script would do, with `ip` and `nft` and the same ruleset JSON."""
    from micropod.net.config import NetworkConfig
    from micropod.net.nft import ruleset

    network = NetworkConfig.parse()

    def nft(vms: list[VmNetwork]) -> None:
        _run(["nft", "-j", "-f", "-"], input=json.dumps(ruleset(network, vms)).encode())

    def add_tap(name: str) -> None:
        _run(["ip", "tuntap", "add", "dev", name, "mode", "tap"])
        _run(["ip", "link", "set", name, "master", network.bridge, "up"])

    _run(["ip", "link", "add", network.bridge, "type", "bridge"])
    _run(["ip", "addr", "add", str(network.gateway_interface), "dev", network.bridge])
    _run(["ip", "link", "set", network.bridge, "up"])
    resident = _vm(0)
    add_tap(resident.tap)
    nft([resident])
    samples = []
    for i in range(iterations + 1):  # the first cycle is a warm-up
        vm = _vm(1 + i)
        start = time.perf_counter()
        add_tap(vm.tap)
        nft([resident, vm])
        _run(["ip", "link", "del", vm.tap])
        nft([resident])
        samples.append(time.perf_counter() - start)
    return samples[1:]


def setup_teardown() -> dict[str, Any]:
    from tests.netns import in_fresh_netns

    with tempfile.TemporaryDirectory(prefix="micropod-bench-net-") as tmp:
        micropod_samples: list[float] = in_fresh_netns(_micropod_cycles, str(Path(tmp) / "root"), ITERATIONS,
                                                       timeout=TIMEOUT)
    shell_samples: list[float] = in_fresh_netns(_shell_cycles, ITERATIONS, timeout=TIMEOUT)
    micropod_ms, shell_ms = statistics.median(micropod_samples) * 1e3, statistics.median(shell_samples) * 1e3
    return {
        "iterations": ITERATIONS,
        "micropod_ms": round(micropod_ms, 2),
        "shell_ms": round(shell_ms, 2),
        "ratio": round(micropod_ms / shell_ms, 3),
        "samples": {
            "micropod_ms": [round(s * 1e3, 2) for s in micropod_samples],
            "shell_ms": [round(s * 1e3, 2) for s in shell_samples],
        },
    }


def run() -> dict[str, Any]:
    return {"tcp_throughput": tcp_throughput(), "setup_teardown": setup_teardown()}


def main(argv: Sequence[str]) -> int:
    if len(argv) == 2 and argv[0] == "--receive":
        json.dump(receive(int(argv[1])), sys.stdout)
        sys.stdout.write("\n")
        return 0
    json.dump(run(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
