"""Pods without a VM: the drive pool, the pods' table, the pod's config and VM spec, ps's pod column and filter,
and a pod's disks on Firecracker against the swagger-checking fake."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from micropod.errors import ConflictError, MicropodError, NotFoundError, StateError, UsageError
from micropod.monitor.pool import DrivePool, PlaceholderDisks, PoolExhausted
from micropod.paths import VmDir
from micropod.podconfig import PodConfig, check_pool
from micropod.runconfig import NetworkSettings
from micropod.state import StateStore, VmRecord
from micropod.state.pods import PodRecord, PodStore
from micropod.vmm.factory import POD_WORD, build_pod_spec
from micropod.vmm.qemu import QemuLayout, qemu_argv
from tests import fake_firecracker as fake

POD_ID = "a" * 64


class RecordedDisks:
    """Slots as a VMM lends them, with every attach and detach recorded."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.calls: list[tuple[str, ...]] = []

    def slot_ids(self, writable: bool) -> list[str]:
        return [f"hd{i}" for i in range(self.slots)]

    def attach(self, slot: str, path: Path, writable: bool) -> str:
        self.calls.append(("attach", slot, path.name, "rw" if writable else "ro"))
        return f"scsi:{slot[2:]}"

    def detach(self, slot: str) -> None:
        self.calls.append(("detach", slot))


def files(tmp_path: Path, *names: str) -> list[Path]:
    made = []
    for name in names:
        (tmp_path / name).write_bytes(b"\0" * 4096)
        made.append(tmp_path / name)
    return made


def test_a_file_several_containers_use_is_attached_once_and_freed_with_its_last_user(tmp_path: Path) -> None:
    base, upper_a, upper_b = files(tmp_path, "base.sqfs", "a.ext4", "b.ext4")
    disks = RecordedDisks(4)
    pool = DrivePool(disks, 4)
    assert pool.attach("a", base, False) == "scsi:0"
    assert pool.attach("a", upper_a, True) == "scsi:1"
    assert pool.attach("b", tmp_path / "." / "base.sqfs", False) == "scsi:0"  # the same file, by another path
    assert pool.attach("b", upper_b, True) == "scsi:2"
    assert pool.address_of(upper_b) == "scsi:2"
    assert pool.release("a") == ["hd1"]  # the base stays: b still uses it
    assert pool.release("b") == ["hd0", "hd2"]
    assert disks.calls == [("attach", "hd0", "base.sqfs", "ro"), ("attach", "hd1", "a.ext4", "rw"),
                           ("attach", "hd2", "b.ext4", "rw"), ("detach", "hd1"), ("detach", "hd0"),
                           ("detach", "hd2")]
    assert pool.attach("c", upper_a, True) == "scsi:0"  # freed slots are lent again


def test_an_exhausted_pool_and_a_read_only_file_asked_writable_are_refused(tmp_path: Path) -> None:
    base, upper = files(tmp_path, "base.sqfs", "upper.ext4")
    pool = DrivePool(RecordedDisks(2), 2)
    pool.attach("a", base, False)
    pool.attach("a", upper, True)
    with pytest.raises(PoolExhausted, match=r"drive pool is exhausted.*larger --drive-pool"):
        pool.attach("b", files(tmp_path, "other.ext4")[0], True)
    with pytest.raises(ConflictError, match="attached read-only in this pod"):
        pool.attach("b", base, True)
    assert isinstance(PoolExhausted("x"), UsageError)  # one clear line, exit 125
    with pytest.raises(UsageError, match="invalid --drive-pool 0"):
        check_pool(0, "qemu")
    with pytest.raises(UsageError, match="a pod on firecracker holds 1 to 8"):
        check_pool(9, "firecracker")
    assert check_pool(64, "qemu") == 64


def test_the_pods_table_finds_refuses_duplicates_and_notices_a_vanished_monitor(tmp_path: Path) -> None:
    store = PodStore(tmp_path / "state.db")
    store.insert(PodRecord(id=POD_ID, name="web", created=time.time() - 60, status="running",
                           labels=json.dumps({"tier": "front"}), monitor_pid=2 ** 22 + 7, monitor_start=1))
    with pytest.raises(ConflictError, match='the pod name "web" is already in use'):
        store.insert(PodRecord(id="b" * 64, name="web", created=time.time(), status="created"))
    assert store.find("web").id == store.find("aaaa").id == POD_ID
    assert store.find("web").label_map == {"tier": "front"}
    with pytest.raises(NotFoundError, match="no such pod: nope"):
        store.find("nope")
    (reconciled,) = store.reconcile()
    assert (reconciled.status, reconciled.error) == ("dead", "the pod's monitor and VMM vanished without "
                                                               "recording an end")
    store.close()


def pod_config(tmp_path: Path, backend: str, pool: int = 2) -> PodConfig:
    return PodConfig(pod_id=POD_ID, name="web", backend=backend, kernel=str(tmp_path / "vmlinux"),
                     system=str(tmp_path / "system.sqfs"), vcpus=2, memory_mib=512, hostname="web", pool=pool,
                     network=NetworkSettings(mode="none"))


def test_the_pods_config_round_trips_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    cfg = pod_config(tmp_path, "qemu")
    cfg.dump(tmp_path / "config.json")
    assert PodConfig.load(tmp_path / "config.json") == cfg
    (tmp_path / "config.json").write_text('{"schema": 5}')
    with pytest.raises(StateError, match="newer than this micropod knows"):
        PodConfig.load(tmp_path / "config.json")


def test_a_pods_vm_on_qemu_has_a_scsi_controller_and_no_container_disks(tmp_path: Path) -> None:
    spec = build_pod_spec(pod_config(tmp_path, "qemu", pool=3), VmDir(tmp_path))
    assert [d.drive_id for d in spec.drives] == ["system"] and spec.hot_disks == 6
    assert spec.cmdline.endswith(POD_WORD)
    argv = qemu_argv(spec, Path("/usr/bin/qemu-system-x86_64"), "tcg", QemuLayout.in_dir(tmp_path))
    assert "virtio-scsi-device,id=scsi0" in argv and argv.count("virtio-blk-device,drive=system") == 1
    # every virtio-mmio transport counts: microvm without ACPI has 8
    assert sum(1 for word in argv if word.startswith("virtio-")) <= 8


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fcpod-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_pods_disks_on_firecracker_are_placeholder_drives_patched_as_the_swagger_says(short_tmp: Path) -> None:
    from micropod.vmm.firecracker import FirecrackerVmm

    for name in ("vmlinux", "system.sqfs"):
        (short_tmp / name).write_bytes(b"\0" * 512)
    run = short_tmp / "run"
    run.mkdir()
    cfg = pod_config(short_tmp, "firecracker", pool=2)
    spec = build_pod_spec(cfg, VmDir(run))
    assert [d.drive_id for d in spec.drives] == ["system", "ro0", "ro1", "rw0", "rw1"] and spec.hot_disks == 0
    bin_dir = short_tmp / "bin"
    bin_dir.mkdir()
    (short_tmp / "guest").mkdir()
    vmm = FirecrackerVmm(spec, fake.write_launcher(bin_dir, {"FAKE_FC_GUEST_DIR": str(short_tmp / "guest")}))
    try:
        vmm.start()
        pool = DrivePool(PlaceholderDisks(vmm, spec, cfg.pool, lambda slot: run / f"placeholder-{slot}.img"), 2)
        base, upper = files(short_tmp, "base.sqfs", "upper.ext4")
        assert (pool.attach("a", base, False), pool.attach("a", upper, True)) == ("/dev/vdb", "/dev/vdd")
        pool.release("a")
        patches = [r for r in fake.read_requests(vmm.api_socket) if r["method"] == "PATCH"]
        assert all(r["accepted"] for r in patches), patches
        assert [(r["path"], Path(r["body"]["path_on_host"]).name) for r in patches] == [
            ("/drives/ro0", "base.sqfs"), ("/drives/rw0", "upper.ext4"),
            ("/drives/ro0", "placeholder-ro0.img"), ("/drives/rw0", "placeholder-rw0.img")]
    finally:
        vmm.kill()


def test_ps_shows_and_filters_by_pod(tmp_path: Path) -> None:
    pods = PodStore(tmp_path / "state.db")
    pods.insert(PodRecord(id=POD_ID, name="web", created=time.time(), status="stopped"))
    pods.close()
    store = StateStore(tmp_path / "state.db")
    for index, (name, pod) in enumerate((("in-pod", POD_ID), ("alone", ""))):
        store.insert(VmRecord(id=f"{index + 1:x}" * 64, name=name, image="hello", image_id="ab" * 32,
                              command=json.dumps(["true"]), created=time.time(), status="exited", pod=pod))
    store.close()

    def ps(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "micropod", "--root", str(tmp_path), "ps", "-a", *args],
                              capture_output=True, text=True, timeout=60)

    table = ps("--pod").stdout.splitlines()
    rows = {line.split()[-2] if line.split()[-1] == "web" else line.split()[-1]: line for line in table[1:]}
    assert table[0].split()[-1] == "POD" and rows["in-pod"].split()[-1] == "web", table
    assert rows["alone"].split()[-1] == "alone", table  # no pod, an empty column
    for wanted in ("pod=web", "pod=aaaa"):
        assert [json.loads(line)["Names"] for line in ps("--format", "json", "-f", wanted).stdout.splitlines()] \
            == ["in-pod"]
    listed = json.loads(ps("--format", "json", "-f", "name=in-pod").stdout)
    assert (listed["Pod"], listed["PodName"]) == (POD_ID, "web")


class FailingDisks(RecordedDisks):
    def detach(self, slot: str) -> None:
        from micropod.errors import VmmError

        if slot == "hd1":
            raise VmmError("the guest did not release disk hd1 within 10s")
        super().detach(slot)


def test_a_slot_the_guest_may_still_use_is_never_lent_again(tmp_path: Path) -> None:
    base, upper, other = files(tmp_path, "base.sqfs", "upper.ext4", "other.ext4")
    pool = DrivePool(FailingDisks(3), 3)
    pool.attach("a", base, False)
    pool.attach("a", upper, True)
    with pytest.raises(MicropodError, match="did not release disk hd1"):
        pool.release("a")
    assert set(pool.lent) == {"hd1"}  # the base was freed, the stuck upper was not
    with pytest.raises(ConflictError, match="may still be mounted in this pod's VM"):
        pool.attach("a", upper, True)  # not even for the container that had it
    assert pool.attach("b", other, True) == "scsi:0"
    # a failed unmount in the guest: what the container held is kept out of use, a shared read-only base too
    pool.attach("c", base, False)
    pool.quarantine("c")
    assert pool.release("b") == ["hd0"] and pool.attach("d", other, True) == "scsi:0"
    assert pool.attach("d", base, False) == "scsi:2"  # read-only: sharing the quarantined base is harmless
