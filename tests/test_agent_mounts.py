"""Mount plans as data, and applying them in a private mount namespace."""

from __future__ import annotations

import os
import stat
import traceback
from pathlib import Path

import pytest

from micropod import syscalls
from micropod.agent import mounts
from micropod.agent.mounts import Device, FlushCache, Mkdir, Mount, RootfsDirs, Symlink


def test_overlay_plan() -> None:
    root, plan = mounts.rootfs_plan({"lower": "/dev/vdb", "upper": "/dev/vdc"}, RootfsDirs("/mnt"))
    assert root == "/mnt/root"
    assert plan == [
        Mkdir("/mnt"), Mkdir("/mnt/lower"), Mkdir("/mnt/upper"), Mkdir("/mnt/root"),
        # cached blocks are dropped first: a VM restored from a snapshot saw other disks at boot
        FlushCache("/dev/vdb"), Mount("/dev/vdb", "/mnt/lower", "squashfs", syscalls.MS_RDONLY),
        FlushCache("/dev/vdc"), Mount("/dev/vdc", "/mnt/upper", "ext4"),
        Mkdir("/mnt/upper/upper"), Mkdir("/mnt/upper/work"),
        Mount("overlay", "/mnt/root", "overlay", 0,
              "lowerdir=/mnt/lower,upperdir=/mnt/upper/upper,workdir=/mnt/upper/work"),
    ]


def test_single_disk_and_directory_plans() -> None:
    assert mounts.rootfs_plan({"disk": "/dev/vdb"}, RootfsDirs("/mnt")) == (
        "/mnt/root", [Mkdir("/mnt"), Mkdir("/mnt/root"), Mount("/dev/vdb", "/mnt/root", "ext4")])
    assert mounts.rootfs_plan({"path": "/srv/c1"}, RootfsDirs("/mnt")) == ("/srv/c1", [])
    with pytest.raises(ValueError, match="rootfs needs"):
        mounts.rootfs_plan({"lower": "/dev/vdb"}, RootfsDirs("/mnt"))


def test_boot_plan_tolerates_an_automounted_devtmpfs() -> None:
    devtmpfs = [op for op in mounts.boot_plan() if isinstance(op, Mount) and op.target == "/dev"]
    assert len(devtmpfs) == 1 and devtmpfs[0].busy_ok
    assert {op.target for op in mounts.boot_plan() if isinstance(op, Mount)} == {
        "/proc", "/sys", "/dev", "/dev/pts", "/run", "/tmp", "/sys/fs/cgroup"}


def test_container_plan_is_dockers_dev() -> None:
    plan = mounts.container_plan("/r")
    targets = [op.target for op in plan if isinstance(op, Mount)]
    assert targets == ["/r/proc", "/r/sys", "/r/dev", "/r/dev/pts", "/r/dev/shm"]
    sysfs = next(op for op in plan if isinstance(op, Mount) and op.fstype == "sysfs")
    assert sysfs.flags & syscalls.MS_RDONLY
    devpts = next(op for op in plan if isinstance(op, Mount) and op.fstype == "devpts")
    assert devpts.data is not None and "newinstance" in devpts.data and "ptmxmode=0666" in devpts.data
    assert Device("/r/dev/null", 1, 3, "/dev/null") in plan
    assert Symlink("pts/ptmx", "/r/dev/ptmx") in plan
    assert Symlink("/proc/self/fd", "/r/dev/fd") in plan
    # Every mount point is made (and checked) before it is mounted on.
    for index, op in enumerate(plan):
        if isinstance(op, Mount):
            assert Mkdir(op.target, mode=0o1777 if op.target.endswith("shm") else 0o755) in plan[:index]


def _in_private_namespace(test: str, **values: object) -> None:
    """Run ``test`` in a child with its own mount namespace, so nothing leaks to the host."""
    pid = os.fork()
    if pid == 0:
        try:
            syscalls.unshare(syscalls.CLONE_NEWNS)
            syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
            exec(test, {"mounts": mounts, "os": os, "stat": stat, "Path": Path, **values})
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")
def test_container_plan_applies_and_unmounts(tmp_path: Path) -> None:
    _in_private_namespace(
        "mounted = []\n"
        "mounts.apply(mounts.container_plan(root), mounted)\n"
        "assert len(mounted) >= 5\n"
        "st = os.stat(root + '/dev/null')\n"
        "assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3\n"
        "assert stat.S_IMODE(st.st_mode) == 0o666\n"
        "assert os.readlink(root + '/dev/ptmx') == 'pts/ptmx'\n"
        "assert os.path.exists(root + '/proc/self')\n"
        "assert stat.S_IMODE(os.stat(root + '/dev/shm').st_mode) == 0o1777\n"
        "assert mounts.unmount_all(mounted) == []\n"
        "assert mounted == [] and os.listdir(root + '/dev') == [] and os.listdir(root + '/proc') == []\n",
        root=str(tmp_path),
    )


def test_refuses_to_mount_over_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "proc").symlink_to("/etc")
    with pytest.raises(OSError, match="not a directory"):
        mounts.apply([Mkdir(str(tmp_path / "proc"))], [])
