"""The agent's filesystem work, as plain data first and applied in one place.

Plans are lists of small operations (Mkdir, Mount, Device, Symlink) that tests compare as values;
``apply`` runs them and records every mount it made so that ``unmount_all`` can undo them in
reverse order at shutdown, leaving the container's ext4 upper layer clean.
"""

from __future__ import annotations

import errno
import os
import stat

from micropod import syscalls
from micropod.syscalls import (
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_STRICTATIME,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class _Op:
    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Mkdir(_Op):
    """A directory that must exist (and be a real directory, never a symlink out of the root)."""

    __slots__ = ("mode", "path")

    def __init__(self, path: str, mode: int = 0o755) -> None:
        self.path = path
        self.mode = mode


class Mount(_Op):
    __slots__ = ("busy_ok", "data", "flags", "fstype", "source", "target")

    def __init__(
        self, source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None,
        *, busy_ok: bool = False,
    ) -> None:
        self.source = source
        self.target = target
        self.fstype = fstype
        self.flags = flags
        self.data = data
        # The kernel may have mounted it already (devtmpfs with CONFIG_DEVTMPFS_MOUNT).
        self.busy_ok = busy_ok


class FlushCache(_Op):
    """Drop a block device's cached blocks before mounting it.

    A VM restored from a snapshot has the template's view of its disks cached (the partition scan
    at boot read their first blocks); this VM's disks are different files behind the same devices.
    """

    __slots__ = ("device",)

    def __init__(self, device: str) -> None:
        self.device = device


class Device(_Op):
    """A character device node; bind-mounted from ``host_path`` where mknod is not allowed."""

    __slots__ = ("host_path", "major", "minor", "mode", "path")

    def __init__(self, path: str, major: int, minor: int, host_path: str, mode: int = 0o666) -> None:
        self.path = path
        self.major = major
        self.minor = minor
        self.host_path = host_path
        self.mode = mode


class Symlink(_Op):
    __slots__ = ("path", "target")

    def __init__(self, target: str, path: str) -> None:
        self.target = target
        self.path = path


Op = Mkdir | Mount | FlushCache | Device | Symlink


def boot_plan() -> list[Op]:
    """The agent's own system mounts, on the read-only guest root whose mount points exist."""
    return [
        Mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC),
        Mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC),
        Mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755", busy_ok=True),
        Mkdir("/dev/pts"),
        Mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666,gid=5"),
        Mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
        Mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
        Mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC),
    ]


class RootfsDirs:
    """Where one container's disks are mounted in the guest."""

    __slots__ = ("base", "lower", "root", "upper")

    def __init__(self, base: str) -> None:
        self.base = base
        self.lower = f"{base}/lower"
        self.upper = f"{base}/upper"
        self.root = f"{base}/root"


def rootfs_plan(rootfs: dict[str, Any], dirs: RootfsDirs) -> tuple[str, list[Op]]:
    """The container's root directory, and how to assemble it from the spec's ``rootfs``.

    ``{"lower": dev, "upper": dev}``: read-only squashfs image plus a per-VM ext4 for writes, joined
    by overlayfs. ``{"disk": dev, "fstype": "ext4"}``: one writable disk holding the whole image.
    ``{"path": dir}``: an existing directory (the agent's test mode).
    """
    if "path" in rootfs:
        return str(rootfs["path"]), []
    if "disk" in rootfs:
        return dirs.root, [
            Mkdir(dirs.base),
            Mkdir(dirs.root),
            Mount(rootfs["disk"], dirs.root, rootfs.get("fstype", "ext4")),
        ]
    if "lower" in rootfs and "upper" in rootfs:
        upperdir, workdir = f"{dirs.upper}/upper", f"{dirs.upper}/work"
        return dirs.root, [
            Mkdir(dirs.base),
            Mkdir(dirs.lower),
            Mkdir(dirs.upper),
            Mkdir(dirs.root),
            FlushCache(rootfs["lower"]),
            Mount(rootfs["lower"], dirs.lower, rootfs.get("lower_fstype", "squashfs"), MS_RDONLY),
            FlushCache(rootfs["upper"]),
            Mount(rootfs["upper"], dirs.upper, rootfs.get("upper_fstype", "ext4")),
            Mkdir(upperdir),
            Mkdir(workdir),
            Mount("overlay", dirs.root, "overlay", 0,
                  f"lowerdir={dirs.lower},upperdir={upperdir},workdir={workdir}"),
        ]
    raise ValueError(f"rootfs needs 'lower' and 'upper', 'disk' or 'path', got {sorted(rootfs)}")


_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0))


def container_plan(root: str) -> list[Op]:
    """The kernel filesystems and the /dev a container expects, as docker's default spec sets them."""
    dev = f"{root}/dev"
    plan: list[Op] = [
        Mkdir(f"{root}/proc"),
        Mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC),
        Mkdir(f"{root}/sys"),
        Mount("sysfs", f"{root}/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY),
        Mkdir(dev),
        # A fresh tmpfs rather than the agent's devtmpfs: the container sees only the devices below.
        Mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_STRICTATIME, "mode=755,size=65536k"),
        Mkdir(f"{dev}/pts"),
        Mount("devpts", f"{dev}/pts", "devpts", MS_NOSUID | MS_NOEXEC,
              "newinstance,ptmxmode=0666,mode=0620,gid=5"),
        Mkdir(f"{dev}/shm", 0o1777),
        Mount("shm", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=65536k"),
    ]
    plan += [Device(f"{dev}/{name}", major, minor, f"/dev/{name}") for name, major, minor in _DEVICES]
    plan += [
        Symlink("pts/ptmx", f"{dev}/ptmx"),
        Symlink("/proc/self/fd", f"{dev}/fd"),
        Symlink("/proc/self/fd/0", f"{dev}/stdin"),
        Symlink("/proc/self/fd/1", f"{dev}/stdout"),
        Symlink("/proc/self/fd/2", f"{dev}/stderr"),
    ]
    return plan


def apply(plan: list[Op], mounted: list[str]) -> None:
    """Run a plan; each mount made is appended to ``mounted`` (even if a later step fails)."""
    for op in plan:
        if isinstance(op, Mkdir):
            _mkdir(op)
        elif isinstance(op, Mount):
            try:
                syscalls.mount(op.source, op.target, op.fstype, op.flags, op.data)
            except OSError as exc:
                if op.busy_ok and exc.errno == errno.EBUSY:
                    continue
                raise
            mounted.append(op.target)
        elif isinstance(op, FlushCache):
            syscalls.flush_block_device(op.device)
        elif isinstance(op, Device):
            _device(op, mounted)
        else:
            os.symlink(op.target, op.path)


def _mkdir(op: Mkdir) -> None:
    try:
        st = os.lstat(op.path)
    except FileNotFoundError:
        os.mkdir(op.path, op.mode)
        os.chmod(op.path, op.mode)  # mkdir's mode passes through the umask
        return
    if not stat.S_ISDIR(st.st_mode):
        # Mounting over a symlink would follow it, possibly out of the container's root.
        raise OSError(errno.ENOTDIR, f"{op.path} exists and is not a directory")


def _device(op: Device, mounted: list[str]) -> None:
    try:
        os.mknod(op.path, stat.S_IFCHR | op.mode, os.makedev(op.major, op.minor))
        os.chmod(op.path, op.mode)
    except PermissionError:
        os.close(os.open(op.path, os.O_WRONLY | os.O_CREAT, 0o666))
        syscalls.mount(op.host_path, op.path, None, MS_BIND)
        mounted.append(op.path)


def unmount_all(mounted: list[str]) -> list[str]:
    """Unmount in reverse order; detach what stays busy. Returns the errors, for the log."""
    errors = []
    while mounted:
        target = mounted.pop()
        try:
            syscalls.umount2(target)
        except OSError as exc:
            errors.append(str(exc))
            try:
                syscalls.umount2(target, syscalls.MNT_DETACH)
            except OSError as detach_exc:
                errors.append(str(detach_exc))
    return errors
