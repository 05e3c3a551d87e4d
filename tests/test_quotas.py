"""Quotas without a VM: parsing docker's flags, the VMM's cgroup caps, tc's commands, Firecracker's rate limiters
against the swagger-checking fake, and what `update` may change on a running VM."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from micropod.errors import UsageError
from micropod.monitor.hostcgroup import OVERHEAD_MIB, caps
from micropod.net.shaping import shaping_commands
from micropod.quotas import DiskRate, IoLimits, Quotas, parse_cpuset, parse_disk_rates, parse_rate
from micropod.runconfig import ContainerSpec, NetworkSettings, RunConfig, VolumeMount
from micropod.service.update import UpdateRequest, changed
from micropod.vmm.base import Drive, NetInterface, VmSpec
from tests import fake_firecracker as fake

MIB = 1 << 20


def test_disk_rates_per_path_and_for_every_disk() -> None:
    rates = parse_disk_rates({"--device-write-bps": ("5m", "/data:1m"), "--device-read-iops": ("/:200",)})
    quotas = Quotas(disk_rates=rates)
    assert quotas.disk_limits("/") == IoLimits(write_bps=5 * MIB, read_iops=200)
    assert quotas.disk_limits("/data") == IoLimits(write_bps=MIB)
    assert quotas.disk_limits("/other") == IoLimits(write_bps=5 * MIB)
    assert not Quotas().disk_limits("/")


@pytest.mark.parametrize(("flags", "problem"), [
    ({"--device-write-bps": ("5x",)}, "invalid --device-write-bps '5x': use a rate such as 5m"),
    ({"--device-read-iops": ("/:1.5",)}, "invalid --device-read-iops '1.5'"),
    ({"--device-read-bps": ("data:1m",)}, "use \\[PATH:\\]RATE"),
    ({"--device-write-bps": ("0",)}, "must be above 0"),
])
def test_a_malformed_rate_is_one_clear_line(flags: dict[str, tuple[str, ...]], problem: str) -> None:
    with pytest.raises(UsageError, match=problem):
        parse_disk_rates(flags)


def test_cpusets_and_network_rates_are_checked() -> None:
    assert parse_cpuset("0") == "0" and parse_rate("10m", "--network-rate") == 10 * MIB
    for bad, problem in (("0-", "use numbers and ranges"), ("1-0", "runs backwards"), ("4096", "has no CPU 4096")):
        with pytest.raises(UsageError, match=problem):
            parse_cpuset(bad)


def test_the_vmms_cgroup_takes_shares_cpuset_and_reservation() -> None:
    assert caps(0.5, 256, Quotas(cpu_shares=512, cpuset_cpus="0", memory_reservation_mib=128)) == {
        "cpu": {"quota": 50_000, "period": 100_000, "shares": 512, "cpus": "0"},
        "memory": {"limit": (256 + OVERHEAD_MIB) * MIB, "reservation": (128 + OVERHEAD_MIB) * MIB}}
    assert caps(1, 256) == {"cpu": {"quota": 100_000, "period": 100_000}, "memory": {"limit": (256 + 512) * MIB}}


def test_tc_holds_what_the_tap_delivers_and_nft_what_the_guest_sends() -> None:
    from micropod.net.config import NetworkConfig
    from micropod.net.nft import Ruleset, VmNetwork

    (command,) = shaping_commands("mp-abc", MIB)
    assert command[:7] == ["tc", "qdisc", "replace", "dev", "mp-abc", "root", "tbf"] and "8388608bit" in command
    assert shaping_commands("mp-abc", 0) == [["tc", "qdisc", "del", "dev", "mp-abc", "root"]]
    import ipaddress

    vm = VmNetwork("a" * 64, "mp-abc", "02:00:00:00:00:01", ipaddress.IPv4Address("10.88.0.2"),
                   network=NetworkConfig(), rate=MIB)
    first_rule = Ruleset("micropod-x").antispoof(vm)[1]["add"]["rule"]
    assert first_rule["expr"][0] == {"limit": {"rate": MIB, "per": "second", "rate_unit": "bytes",
                                               "burst": MIB // 10, "burst_unit": "bytes", "inv": True}}


def config(tmp_path: Path, **changes: object) -> RunConfig:
    spec = ContainerSpec(args=("true",), env=(), volumes=(VolumeMount("data", "/data", str(tmp_path / "v")),))
    base = RunConfig(vm_id="a" * 64, name="c", image="hello", image_id="b" * 64, backend="qemu", kernel="k",
                     system="s", rootfs="r", vcpus=2, memory_mib=256, container=spec,
                     network=NetworkSettings(mode="bridge", tap="mp-x"))
    return RunConfig(**{**base.__dict__, **changes})


def test_update_changes_what_a_running_vm_can_change_and_refuses_the_rest(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    new = changed(cfg, UpdateRequest(cpus="0.5", pids_limit=30, cpu_shares=100, network_rate=MIB,
                                     disk_rates=(DiskRate("/data", IoLimits(write_bps=MIB)),)), running=True)
    assert (new.cpu_limit, new.vcpus, new.container.pids_limit) == (0.5, 2, 30)
    assert new.quotas.disk_limits("/data") == IoLimits(write_bps=MIB) and new.quotas.network_rate == MIB
    with pytest.raises(UsageError, match="the running VM has 2 vCPU"):
        changed(cfg, UpdateRequest(cpus="3"), running=True)
    assert changed(cfg, UpdateRequest(cpus="3"), running=False).vcpus == 3
    with pytest.raises(UsageError, match="memory is fixed at boot"):
        changed(cfg, UpdateRequest(memory="512m"), running=True)
    with pytest.raises(UsageError, match="no disk of the container is mounted at /nope"):
        changed(cfg, UpdateRequest(disk_rates=(DiskRate("/nope", IoLimits(read_bps=1)),)), running=True)
    with pytest.raises(UsageError, match="--network-rate needs a network"):
        changed(config(tmp_path, network=NetworkSettings()), UpdateRequest(network_rate=MIB), running=False)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fcq-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_firecracker_gets_its_rate_limiters_as_the_swagger_says(short_tmp: Path) -> None:
    from micropod.vmm.firecracker import FirecrackerVmm

    for name in ("vmlinux", "system.sqfs", "upper.ext4"):
        (short_tmp / name).write_bytes(b"\0" * 512)
    (short_tmp / "guest").mkdir()
    (short_tmp / "bin").mkdir()
    spec = VmSpec(vm_id="c" * 64, kernel=short_tmp / "vmlinux", cmdline="console=ttyS0", vcpus=1, memory_mib=256,
                  drives=(Drive("system", short_tmp / "system.sqfs", read_only=True, is_root=True),
                          Drive("upper", short_tmp / "upper.ext4", read_only=False,
                                limits=IoLimits(read_bps=8 * MIB, write_bps=5 * MIB, write_iops=100))),
                  run_dir=short_tmp / "run", console_log=short_tmp / "run" / "console.log",
                  nets=(NetInterface("eth0", "mp-tap0", "02:fc:00:00:00:01", rate=MIB),))
    vmm = FirecrackerVmm(spec, fake.write_launcher(short_tmp / "bin", {"FAKE_FC_GUEST_DIR": str(short_tmp / "guest")}))
    try:
        vmm.start()
        vmm.change_limits({"upper": IoLimits()}, 2 * MIB)
        requests = fake.read_requests(vmm.api_socket)
    finally:
        vmm.kill()
    assert all(r["accepted"] for r in requests), [r for r in requests if not r["accepted"]]
    by_path = {(r["method"], r["path"]): r["body"] for r in requests}
    # one limiter per drive: the lower of the read and write rates
    assert by_path[("PUT", "/drives/upper")]["rate_limiter"] == {
        "bandwidth": {"size": 5 * MIB, "refill_time": 1000}, "ops": {"size": 100, "refill_time": 1000}}
    assert by_path[("PUT", "/network-interfaces/eth0")]["rx_rate_limiter"] == {
        "bandwidth": {"size": MIB, "refill_time": 1000}}
    assert by_path[("PATCH", "/drives/upper")]["rate_limiter"]["bandwidth"] == {"size": 0, "refill_time": 0}
    assert by_path[("PATCH", "/network-interfaces/eth0")]["tx_rate_limiter"] == {
        "bandwidth": {"size": 2 * MIB, "refill_time": 1000}}
