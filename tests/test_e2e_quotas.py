"""Quotas in real VMs under QEMU, measured against the limit: a disk's write rate seen inside the guest, the VMM's
CPU time from its host cgroup, the NIC's rate seen inside the guest, and `update` on a running VM
(micropod/quotas.py, micropod/monitor/update.py)."""

from __future__ import annotations

import json
import sys
import time

import pytest

from micropod.net.addressing import tap_name
from micropod.unixsock import SocketDir
from micropod.vmm.qmp import QmpClient
from tests.conftest import Cli
from tests.nettopo import OUTSIDE_IP, Topology
from tests.test_e2e_net import started, world  # noqa: F401  (world is a fixture)
from tests.test_e2e_run import one_line_error
from tests.test_e2e_runtime import _cgroup_file

pytestmark = pytest.mark.e2e

WAIT = 300
MIB = 1 << 20
UPTIME = "cut -d' ' -f1 /proc/uptime"
# Reports the rate past the first ``skip`` bytes: nft's limit lets one second's worth through at once.
RECEIVE = ("import socket, sys, time\n"
           "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
           "s.bind(('0.0.0.0', 9001)); s.listen(); print('listening', flush=True)\n"
           "c, _ = s.accept(); want, skip, got, mark = int(sys.argv[1]), int(sys.argv[2]), 0, None\n"
           "while got < want:\n"
           "    data = c.recv(65536)\n"
           "    if not data: break\n"
           "    got += len(data)\n"
           "    mark = mark or (time.monotonic() if got >= skip else None)\n"
           "print(got, (want - skip) / (time.monotonic() - mark), flush=True); c.close()\n")
SEND = ("import socket, sys\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('0.0.0.0', 9000)); s.listen(); print('listening', flush=True)\n"
        "c, _ = s.accept(); c.sendall(b'x' * int(sys.argv[1])); c.close()\n")


def timed(cli: Cli, name: str, script: str) -> float:
    """Seconds the guest's own clock counts for ``script`` in container ``name``."""
    out = cli("exec", name, "sh", "-c", f"a=$({UPTIME}); {script}; b=$({UPTIME}); echo $a $b", timeout=WAIT)
    assert out.returncode == 0, out.stderr
    first, last = map(float, out.stdout.split()[-2:])
    return last - first


def test_a_disk_write_rate_holds_the_writable_layer_to_it(cli: Cli) -> None:
    assert cli("run", "-d", "--name", "slow", "--device-write-bps", "5m", "hello", "sleep", "600",
               timeout=WAIT).returncode == 0
    seconds = timed(cli, "slow", "dd if=/dev/zero of=/big bs=1M count=15 conv=fsync 2>/dev/null")
    rate = 15 * MIB / seconds
    assert 0.8 * 5 * MIB <= rate <= 1.2 * 5 * MIB, f"{rate / MIB:.2f} MiB/s over {seconds:.2f}s"
    info = json.loads(cli("inspect", "slow").stdout)[0]["HostConfig"]
    assert info["BlkioDeviceWriteBps"] == [{"Path": "*", "Rate": 5 * MIB}]


def test_half_a_cpu_holds_a_spinning_guest_to_half_a_core(cli: Cli) -> None:
    assert cli("run", "-d", "--name", "spin", "--cpus", "0.5", "hello", "sh", "-c", "while :; do :; done",
               timeout=WAIT).returncode == 0
    pid = json.loads(cli("inspect", "spin").stdout)[0]["State"]["Pid"]
    usage = _cgroup_file(pid, "cpuacct", "cpuacct.usage")
    before, start = int(usage.read_text()), time.monotonic()
    time.sleep(4)  # the measurement's window, not a wait for anything
    cores = (int(usage.read_text()) - before) / 1e9 / (time.monotonic() - start)
    assert 0.35 <= cores <= 0.6, f"the VMM used {cores:.2f} cores"


def test_update_changes_a_running_vms_limits_and_refuses_what_cannot_change(cli: Cli) -> None:
    assert cli("run", "-d", "--name", "u", "hello", "sleep", "600", timeout=WAIT).returncode == 0
    pid = json.loads(cli("inspect", "u").stdout)[0]["State"]["Pid"]
    done = cli("update", "--pids-limit", "30", "--cpus", "0.5", "--device-write-bps", "10m", "--cpu-shares", "512",
               "u", timeout=WAIT)
    assert done.returncode == 0, done.stderr
    assert cli("exec", "u", "cat", "/sys/fs/cgroup/pids.max").stdout == "30\n"
    assert _cgroup_file(pid, "cpu", "cpu.cfs_quota_us").read_text().strip() == "50000"
    assert _cgroup_file(pid, "cpu", "cpu.shares").read_text().strip() == "512"
    sockets = SocketDir(cli.root / "vms" / json.loads(cli("inspect", "u").stdout)[0]["Id"])
    qmp = QmpClient(sockets.address("qmp.sock"))  # pytest's deep paths are past sun_path's 107 bytes
    try:
        upper = next(d for d in qmp.execute("query-block") if d["device"] == "upper")
    finally:
        qmp.close()
        sockets.close()
    assert upper["inserted"]["bps_wr"] == 10 * MIB
    host = json.loads(cli("inspect", "u").stdout)[0]["HostConfig"]
    assert (host["PidsLimit"], host["NanoCpus"], host["CpuShares"]) == (30, 500_000_000, 512)

    memory = cli("update", "--memory", "1g", "u")
    assert memory.returncode != 0 and "memory is fixed at boot" in one_line_error(memory.stderr)
    more = cli("update", "--cpus", "4", "u")
    assert more.returncode != 0 and "has 1 vCPU(s)" in one_line_error(more.stderr)
    for bad, problem in ((("--device-write-bps", "5x"), "invalid --device-write-bps '5x'"),
                         (("--cpuset-cpus", "999"), "has no CPU 999"),
                         (("--device-read-bps", "/nowhere:1m"), "no disk of the container is mounted at /nowhere")):
        refused = cli("run", "--rm", *bad, "hello", "true")
        assert refused.returncode == 125 and problem in one_line_error(refused.stderr), refused.stderr
    assert set(cli("ps", "-aq").stdout.split()) == {json.loads(cli("inspect", "u").stdout)[0]["Id"][:12]}


def test_a_network_rate_holds_what_the_guest_receives(world: tuple[Topology, Cli]) -> None:  # noqa: F811
    topo, cli = world
    assert cli("run", "-d", "--name", "net", "--network-rate", "1m", "hello", "sleep", "600",
               timeout=WAIT).returncode == 0
    size = 3 * MIB
    server = topo.spawn(topo.outside, sys.executable, "-c", SEND, str(size))
    try:
        started(server)
        seconds = timed(cli, "net", f"nc -w 10 {OUTSIDE_IP} 9000 | wc -c > /received")
    finally:
        server.kill()
        server.wait(timeout=10)
    assert cli("exec", "net", "cat", "/received").stdout.strip() == str(size)
    rate = size / seconds
    assert 0.75 * MIB <= rate <= 1.25 * MIB, f"{rate / MIB:.2f} MiB/s over {seconds:.2f}s"

    # What it sends: the host drops what exceeds the rate, and the guest's TCP settles below it.
    sent = 5 * MIB
    receiver = topo.spawn(topo.outside, sys.executable, "-c", RECEIVE, str(sent), str(2 * MIB))
    try:
        started(receiver)
        cli("exec", "net", "sh", "-c", f"head -c {sent} /dev/zero | nc -w 10 {OUTSIDE_IP} 9001", timeout=WAIT)
        got, rate_text = receiver.communicate(timeout=60)[0].split()
    finally:
        receiver.kill()
    assert int(got) == sent and float(rate_text) <= 1.25 * MIB, f"{float(rate_text) / MIB:.2f} MiB/s"

    # update lifts it: no token bucket on the TAP, no limit in its ingress chain
    tap = tap_name(json.loads(cli("inspect", "net").stdout)[0]["Id"])
    assert "tbf" in topo.run(topo.host, "tc", "qdisc", "show", "dev", tap).stdout
    assert cli("update", "--network-rate", "0", "net", timeout=WAIT).returncode == 0
    assert "tbf" not in topo.run(topo.host, "tc", "qdisc", "show", "dev", tap).stdout
    assert "limit rate over" not in topo.run(topo.host, "nft", "list", "ruleset").stdout

