"""A pod's shared directory: one virtio-9p share that its VM has from boot, into which the host binds the host
paths of containers made later (a running microvm takes no new device), as Kata's shared directory does.

The guest can write into the directory (mapped-xattr: what it makes is QEMU's, with no set-id bits on the
host), so nothing here trusts a name in it: the directory is a small tmpfs of its own, entries are made by the
host under an open descriptor of it, with O_EXCL and no following, the mounts are placed through that
descriptor, and only the names the host recorded are ever unbound; unmounts never follow a link. Every mount
under the directory goes before the tmpfs does, and the tmpfs before its pod's directory is removed, so no
recursive removal reaches into a host path or into what the guest built.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from micropod import syscalls
from micropod.errors import StateError, UsageError
from micropod.podconfig import SHARED_DIR

__all__ = ["SHARED_DIR", "bind", "entry_name", "mount_share", "unbind", "unbind_all", "unbind_container",
           "unmount_share"]

UMOUNT_NOFOLLOW = 0x8
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def entry_name(container_id: str, index: int) -> str:
    return f"{container_id[:32]}-{index}"


def unbind_container(share: Path, container_id: str, count: int) -> None:
    """The entries of a container's ``count`` binds, by the names the host gave them (never by what is there)."""
    unbind(share, [entry_name(container_id, i) for i in range(count)])


SHARE_TMPFS = "size=1m,nr_inodes=4096,mode=0700"  # only the entries' mount points live in it


def mount_share(share: Path) -> None:
    """The shared directory a small tmpfs of its own (if it is not one already): the guest can write into it,
    and then fills neither the state root's disk nor its inodes, and what it leaves goes with one unmount. It
    is a shared mount, so that what the host binds there later reaches QEMU's jail (a slave of it)."""
    if not os.path.ismount(share):
        syscalls.mount("tmpfs", str(share), "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC,
                       SHARE_TMPFS)
    syscalls.mount(None, str(share), None, syscalls.MS_SHARED)


def unmount_share(share: Path) -> None:
    """After unbind_all: the tmpfs unmounted, never lazily, so that a host path bound there meanwhile keeps it
    (EBUSY) rather than letting a recursive removal reach into it."""
    if not os.path.ismount(share):
        return
    try:
        syscalls.umount2(str(share), UMOUNT_NOFOLLOW)
    except OSError as exc:
        raise StateError(f"cannot unmount {share}: {exc.strerror}; it is not removed") from None


def bind(share: Path, name: str, source: Path, read_only: bool) -> None:
    """``source`` (a directory or a file, resolved already) bound at ``share``/``name``: a detached mount, made
    read-only (and nosuid, nodev) before it is placed, so the guest never sees it writable."""
    info = os.stat(source)
    directory = os.open(share, _OPEN_DIR)
    try:
        if stat.S_ISDIR(info.st_mode):
            os.mkdir(name, 0o700, dir_fd=directory)
        elif stat.S_ISREG(info.st_mode):
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=directory))
        else:
            raise UsageError(f"host path {source} is neither a directory nor a regular file")
        tree = syscalls.open_tree_clone(str(source))
        try:
            attrs = syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV
            # private: a peer of its source would bring what the host mounts under that path later, with the
            # host's flags, into the share and on into QEMU's jail
            syscalls.mount_setattr_fd(tree, attrs | (syscalls.MOUNT_ATTR_RDONLY if read_only else 0),
                                      propagation=syscalls.MS_PRIVATE)
            point = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
            try:
                syscalls.move_mount_onto(tree, point)
            finally:
                os.close(point)
        finally:
            os.close(tree)
    except BaseException:
        unbind(share, [name])
        raise
    finally:
        os.close(directory)


def unbind(share: Path, names: list[str]) -> None:
    """Idempotent: each entry unmounted (lazily, never through a link) and removed. An entry the guest filled
    meanwhile stays, empty of mounts, until the share's tmpfs goes with its pod."""
    for name in names:
        path = share / name
        while True:
            try:
                syscalls.umount2(str(path), syscalls.MNT_DETACH | UMOUNT_NOFOLLOW)
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOENT):  # not (or no longer) a mount point
                    break
                raise StateError(f"cannot unmount {path}: {exc.strerror}") from None
        try:
            directory = os.open(share, _OPEN_DIR)
        except FileNotFoundError:
            return
        try:
            try:
                os.rmdir(name, dir_fd=directory)
            except NotADirectoryError:
                os.unlink(name, dir_fd=directory)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
                raise StateError(f"cannot remove {path}: {exc.strerror}") from None
        finally:
            os.close(directory)


def mounts_under(share: Path) -> list[str]:
    """The mount points at or below ``share``, deepest first (from /proc/self/mountinfo)."""
    prefix = os.path.realpath(share).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
        for line in info:
            point = _unescape(line.split(" ", 5)[4])
            if point.startswith(prefix):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def unbind_all(share: Path) -> None:
    """Every mount below ``share`` gone, checked, before anything removes the directory."""
    for point in mounts_under(share):
        try:
            syscalls.umount2(point, syscalls.MNT_DETACH | UMOUNT_NOFOLLOW)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOENT):
                raise StateError(f"cannot unmount {point}: {exc.strerror}") from None
    left = mounts_under(share)
    if left:
        raise StateError(f"{share} still has host paths mounted ({', '.join(left)}); it is not removed")


def _unescape(field: str) -> str:
    """mountinfo's octal escapes (space, tab, newline, backslash)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)
