"""The confined VMMs' uids (micropod/vmm/vmm_ids.py) and QEMU's command line by descriptor."""

from __future__ import annotations

from pathlib import Path

import pytest

from micropod.errors import UsageError
from micropod.vmm import vmm_ids
from micropod.vmm.base import Drive, NetInterface, VmSpec
from micropod.vmm.qemu import QemuLayout, qemu_argv
from micropod.vmm.qemu_confined import Handles


def test_each_vm_gets_a_uid_of_its_own_until_it_lets_go(tmp_path: Path) -> None:
    ids = vmm_ids.id_range("3900000-3900001", etc=tmp_path)
    first = vmm_ids.allocate("a" * 64, ids, tmp_path)
    second = vmm_ids.allocate("b" * 64, ids, tmp_path)
    assert {first.uid, second.uid} == {3900000, 3900001}
    with pytest.raises(UsageError, match="no uid is free for another VMM in MICROPOD_VMM_IDS=3900000-3900001"):
        vmm_ids.allocate("c" * 64, ids, tmp_path)
    first.release()
    assert vmm_ids.allocate("c" * 64, ids, tmp_path).uid == first.uid


def test_a_uid_a_process_still_runs_as_is_never_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmm_ids, "_live_uids", lambda: {3900000})
    ids = vmm_ids.id_range("3900000-3900001", etc=tmp_path)
    assert vmm_ids.allocate("a" * 64, ids, tmp_path).uid == 3900001


def test_a_range_someone_else_may_use_is_refused(tmp_path: Path) -> None:
    (tmp_path / "passwd").write_text("root:x:0:0::/root:/bin/sh\nodd:x:3900005:3900005::/:/bin/false\n")
    (tmp_path / "subuid").write_text("alice:100000:65536\n")
    with pytest.raises(UsageError, match="overlaps odd in /etc/passwd"):
        vmm_ids.id_range("3900000-3900010", etc=tmp_path)
    with pytest.raises(UsageError, match="overlaps alice's range in /etc/subuid"):
        vmm_ids.id_range("150000-150001", etc=tmp_path)
    assert vmm_ids.id_range("3900006-3900010", etc=tmp_path) == range(3900006, 3900011)


@pytest.mark.parametrize("text", ["", "5", "9-3", "a-b", "0-10", "1000-2000"])
def test_a_malformed_range_is_refused(text: str) -> None:
    with pytest.raises(UsageError, match="invalid MICROPOD_VMM_IDS"):
        vmm_ids.id_range(text)


def test_a_confined_qemu_is_given_descriptors_never_names(tmp_path: Path) -> None:
    spec = VmSpec(vm_id="a" * 64, kernel=Path("/vmlinux"), cmdline="console=ttyS0", vcpus=1, memory_mib=256,
                  drives=(Drive("system", tmp_path / "system.sqfs", read_only=True, is_root=True),
                          Drive("upper", tmp_path / "upper.ext4", read_only=False)),
                  run_dir=tmp_path, console_log=tmp_path / "console.log",
                  nets=(NetInterface("net0", "mp-tap", "02:00:00:00:00:01"),))
    handles = Handles(drives={"system": [10], "upper": [11, 12]}, taps={"net0": 13}, agent=14, qmp=15)
    argv = qemu_argv(spec, Path("/usr/bin/qemu-system-x86_64"), "tcg", QemuLayout.in_dir(tmp_path), handles)
    text = " ".join(argv)
    assert str(tmp_path) not in text and "mp-tap" not in text and "ifname" not in text
    assert "-add-fd fd=11,set=2,opaque=upper -add-fd fd=12,set=2,opaque=upper" in text
    assert "file=/dev/fdset/2" in text and "file.locking=off" in text and "tap,id=net0,fd=13" in text
    assert "socket,id=agent,fd=14" in text and "socket,id=qmp,fd=15,server=on,wait=off" in text


def test_a_confined_firecracker_runs_under_its_jailer_as_the_vms_uid(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from micropod.errors import VmmUnavailableError
    from micropod.vmm.factory import create_vmm
    from micropod.vmm.firecracker import FirecrackerVmm

    for name in ("firecracker", "jailer"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("MICROPOD_FIRECRACKER", str(tmp_path / "firecracker"))
    monkeypatch.setenv("MICROPOD_JAILER_BASE", str(tmp_path / "jails"))
    spec = VmSpec(vm_id="d" * 64, kernel=tmp_path / "vmlinux", cmdline="console=ttyS0", vcpus=1, memory_mib=256,
                  drives=(), run_dir=tmp_path / "run", console_log=tmp_path / "console.log", vmm_uid=1000042)
    monkeypatch.setenv("MICROPOD_JAILER", str(tmp_path / "jailer"))
    vmm = create_vmm("firecracker", spec)
    assert isinstance(vmm, FirecrackerVmm) and vmm.jailer is not None
    assert (vmm.jailer.uid, vmm.jailer.gid, vmm.jailer.chroot_base) == (1000042, 1000042, tmp_path / "jails")
    argv = vmm.argv()
    assert argv[argv.index("--uid") + 1] == "1000042" and argv[argv.index("--gid") + 1] == "1000042"
    from dataclasses import replace

    unconfined = create_vmm("firecracker", replace(spec, confined=False))
    assert isinstance(unconfined, FirecrackerVmm) and unconfined.jailer is None
    monkeypatch.setenv("MICROPOD_JAILER", str(tmp_path / "nowhere"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(VmmUnavailableError, match="firecracker's jailer not found"):
        create_vmm("firecracker", spec)
