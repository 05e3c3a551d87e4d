"""The agent's side of disks added to a running pod VM (micropod/agent/hotdisk.py), over a made-up sysfs."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from micropod.agent import hotdisk
from micropod.agent.errors import RequestError

FLUSHED: list[str] = []


@pytest.fixture
def sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(hotdisk, "_SCSI_DEVICES", str(tmp_path / "scsi"))
    monkeypatch.setattr(hotdisk, "_SYS_BLOCK", str(tmp_path / "block"))
    monkeypatch.setattr(hotdisk, "_WAIT", 2.0)
    FLUSHED.clear()
    monkeypatch.setattr(hotdisk.syscalls, "flush_block_device", FLUSHED.append)
    (tmp_path / "scsi").mkdir()
    return tmp_path


def disk(sysfs: Path, name: str, size: int, scsi_target: int | None = None) -> None:
    (sysfs / "block" / name).mkdir(parents=True, exist_ok=True)
    (sysfs / "block" / name / "size").write_text(f"{size // 512}\n")
    if scsi_target is not None:
        (sysfs / "scsi" / f"0:0:{scsi_target}:0" / "block" / name).mkdir(parents=True)


def test_a_hot_added_scsi_disk_is_found_by_its_target_once_it_appears(sysfs: Path) -> None:
    disk(sysfs, "vdb", 8192)
    late = threading.Timer(0.2, disk, (sysfs, "sdb", 1 << 20, 3))
    late.start()
    try:
        found = hotdisk.resolve({"scsi:3": 1 << 20, "/dev/vdb": 8192})
    finally:
        late.cancel()
    assert found == {"scsi:3": "/dev/sdb", "/dev/vdb": "/dev/vdb"}
    assert FLUSHED == ["/dev/sdb", "/dev/vdb"]  # what the devices' previous files left cached is dropped


def test_a_swapped_placeholder_is_waited_for_until_it_has_its_new_size(sysfs: Path) -> None:
    disk(sysfs, "vdc", 4096)
    grown = threading.Timer(0.2, disk, (sysfs, "vdc", 1 << 20))
    grown.start()
    assert hotdisk.resolve({"/dev/vdc": 1 << 20}) == {"/dev/vdc": "/dev/vdc"}


@pytest.mark.parametrize(("disks", "problem"), [
    ({"/dev/sda": 1}, "invalid disk address"),
    ({"scsi:../x": 1}, "invalid disk address"),
    ({"scsi:300": 1}, "invalid disk address"),
    ({"/dev/vdb": -1}, "invalid size"),
    ({"/dev/vdb": True}, "invalid size"),
    (["/dev/vdb"], "disks must be an object"),
    ({"scsi:9": 4096}, "the disk at scsi:9 is not there after"),
])
def test_what_the_host_announces_is_checked(sysfs: Path, disks: object, problem: str) -> None:
    disk(sysfs, "vdb", 4096)
    with pytest.raises(RequestError, match=problem):
        hotdisk.resolve(disks)


def test_the_spec_names_the_device_nodes() -> None:
    spec = {"rootfs": {"lower": "scsi:0", "upper": "scsi:1"}, "volumes": [{"device": "scsi:2", "target": "/d"}]}
    hotdisk.substitute(spec, {"scsi:0": "/dev/sda", "scsi:1": "/dev/sdb", "scsi:2": "/dev/sdc"})
    assert spec == {"rootfs": {"lower": "/dev/sda", "upper": "/dev/sdb"},
                    "volumes": [{"device": "/dev/sdc", "target": "/d"}]}
