"""Networking: guest-to-host TCP throughput, and the cost of setting up and tearing down one VM's network.

Everything happens in network namespaces made for the purpose (tests/nettopo.py, tests/netns.py), never in
the machine's own.

- ``tcp_throughput``: busybox ``httpd`` in the guest sends a 64 MiB file over its TAP to a client in the
  host namespace, against the host's busybox ``httpd`` sending the same file from the outside namespace
  over the veth to the same client (the physical reference). httpd uses sendfile, so both senders hand
  the kernel large buffers and TSO applies; ``dd | nc`` was measured first and only showed busybox nc's
  1 KiB writes (one packet and one virtio kick each under TCG). The client times from the first byte to
  the last, so connection set-up is excluded.
- ``run_cost``: `micropod run --rm hello true` with bridge networking against the same with
  ``--network none``, in the same namespace: what a VM's networking adds to a whole run.
- ``setup_teardown``: ``HostNetwork.attach`` + ``detach`` of one VM with one published port, while another
  VM stays attached, against a script doing the same with ``ip tuntap``/``ip link``/``nft -j -f -`` and the
  same ruleset JSON, each in a fresh network namespace.

``python -m bench.net`` prints just this benchmark's JSON; ``python -m bench.net --fetch URL`` is the
client that the throughput runs start inside the host namespace.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.timing import comparison

if TYPE_CHECKING:
    from micropod.net.nft import VmNetwork

REPO = Path(__file__).resolve().parent.parent
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
ITERATIONS = 20
FILE_SIZE = 64 << 20
RUN_SAMPLES = 5
HOST_BUSYBOX = "/bin/busybox"
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


# --- guest-to-host TCP: busybox httpd sends a file (sendfile, so TSO applies), a client here reads it ---


def fetch(url: str, timeout: float = TIMEOUT) -> dict[str, float]:
    """GET ``url``; the rate counts what came after the first chunk, so connection set-up is excluded."""
    import urllib.request

    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with urllib.request.urlopen(url, timeout=timeout) as response:
        first = response.readinto(view)
        start = time.perf_counter()
        counted = 0
        while (n := response.readinto(view)) > 0:
            counted += n
        elapsed = time.perf_counter() - start
    return {"bytes": first + counted, "timed_bytes": counted, "seconds": elapsed}


def _fetch_in(netns_prefix: Sequence[str], url: str) -> float:
    out = _run([*netns_prefix, sys.executable, "-m", "bench.net", "--fetch", url])
    result = json.loads(out)
    if result["bytes"] != FILE_SIZE:
        raise RuntimeError(f"{url} gave {result['bytes']} bytes, not {FILE_SIZE}")
    return float(result["timed_bytes"] / result["seconds"] / 1e6)


def _wait_serving(netns_prefix: Sequence[str], url: str, what: str, detail: Callable[[], str]) -> None:
    deadline = time.monotonic() + 60
    while True:
        probe = subprocess.run([*netns_prefix, sys.executable, "-c",
                                f"import urllib.request; urllib.request.urlopen({url!r}, timeout=2).close()"],
                               capture_output=True, timeout=30)
        if probe.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not serve {url} within 60s:\n{detail()}")
        time.sleep(0.2)


def _run_cost(cli: Sequence[str], env: Mapping[str, str]) -> dict[str, Any]:
    """What bridge networking adds to `run --rm hello true`: the same run with --network none is the baseline."""
    from bench.timing import median_of, time_command

    bridge = [*cli, "run", "--rm", "hello", "true"]
    none = [*cli, "run", "--rm", "--network", "none", "hello", "true"]
    for argv in (bridge, none):
        time_command(argv, env)  # builds the rootfs and each shape's boot snapshot once
    _, bridge_samples = median_of(RUN_SAMPLES, bridge, env)
    _, none_samples = median_of(RUN_SAMPLES, none, env)
    return comparison(("bridge", bridge_samples), ("none", none_samples))


def networked_run() -> tuple[dict[str, Any], dict[str, Any]]:
    """(tcp_throughput, run_cost), measured in one two-namespace world."""
    from micropod.image.demo import build_demo_image
    from tests.nettopo import OUTSIDE_IP, topology

    blocks = FILE_SIZE // (1 << 20)
    serve = f"mkdir -p /www && dd if=/dev/zero of=/www/file bs=1048576 count={blocks} 2>/dev/null && exec "
    with tempfile.TemporaryDirectory(prefix="micropod-bench-net-") as tmp, topology() as topo:
        env = dict(os.environ, MICROPOD_ROOT=str(Path(tmp) / "root"), MICROPOD_SNAPSHOT_DIR=str(Path(tmp) / "snap"))
        env.pop("MICROPOD_NETWORK", None)  # bridge networking, the default
        env.pop("MICROPOD_DEBUG", None)
        in_host = topo.argv(topo.host)
        cli = [*in_host, sys.executable, "-m", "micropod"]
        archive = build_demo_image(Path(tmp) / "hello.oci.tar")
        _run([*cli, "load", "-q", "-i", str(archive)], env)
        run_cost = _run_cost(cli, env)
        _log("starting the guest")
        _run([*cli, "run", "-d", "--name", "bench-net", "hello", "sh", "-c", serve + "httpd -f -p 80 -h /www"], env)
        site = Path(tmp) / "www"
        site.mkdir()
        with (site / "file").open("wb") as f:
            f.truncate(FILE_SIZE)
        outside = topo.spawn(topo.outside, HOST_BUSYBOX, "httpd", "-f", "-p", "80", "-h", str(site))
        try:
            info = json.loads(_run([*cli, "inspect", "bench-net"], env))[0]
            guest_url = f"http://{info['NetworkSettings']['IPAddress']}/file"
            veth_url = f"http://{OUTSIDE_IP}/file"
            _wait_serving(in_host, guest_url, "the guest",
                          lambda: _tail(Path(info["VM"]["ConsoleLog"]).read_text(errors="replace")))
            _wait_serving(in_host, veth_url, "the outside namespace's httpd", lambda: "")
            _fetch_in(in_host, guest_url)  # warm: the guest's page cache and TCP window
            guest_samples = [_fetch_in(in_host, guest_url) for _ in range(RUNS)]
            veth_samples = [_fetch_in(in_host, veth_url) for _ in range(RUNS)]
        finally:
            outside.kill()
            outside.wait(10)
            subprocess.run([*cli, "rm", "-f", "bench-net"], env=env, capture_output=True, timeout=120)
    throughput = comparison(("guest_to_host", guest_samples), ("veth", veth_samples), unit="MBps", digits=1,
                            bytes=FILE_SIZE)
    return throughput, run_cost


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
    from micropod.net.host import HostNetwork
    from micropod.paths import StateRoot

    host = HostNetwork(StateRoot(Path(state)).ensure())
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
        _run(["nft", "-j", "-f", "-"], input=json.dumps(ruleset(vms)).encode())

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
    return comparison(("micropod", [s * 1e3 for s in micropod_samples]), ("shell", [s * 1e3 for s in shell_samples]),
                      unit="ms", digits=2)


def run() -> dict[str, Any]:
    throughput, run_cost = networked_run()
    return {"tcp_throughput": throughput, "setup_teardown": setup_teardown(), "run_cost": run_cost}


def main(argv: Sequence[str]) -> int:
    if len(argv) == 2 and argv[0] == "--fetch":
        json.dump(fetch(argv[1]), sys.stdout)
        sys.stdout.write("\n")
        return 0
    json.dump(run(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
