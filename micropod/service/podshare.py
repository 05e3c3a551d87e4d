"""A pod's shared directory: one virtio-9p share that its VM has from boot, into which the host binds the host
paths of containers made later (a running microvm takes no new device), as Kata's shared directory does.

The guest can write into the directory (mapped-xattr: what it makes is QEMU's, with no set-id bits on the
host), so nothing here trusts a name in it: entries are made by the host under an open descriptor of the
directory, with O_EXCL and no following, and mounted on through that descriptor; unmounts never follow a link.
Every mount under the directory goes before the directory does, since removing it recursively would otherwise
reach into the host paths bound there.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from micropod import syscalls
from micropod.errors import StateError, UsageError
from micropod.podconfig import SHARED_DIR

__all__ = ["SHARED_DIR", "bind", "entry_name", "unbind", "unbind_all", "unbind_container"]

UMOUNT_NOFOLLOW = 0x8
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def entry_name(container_id: str, index: int) -> str:
    return f"{container_id[:32]}-{index}"


def bind(share: Path, name: str, source: Path, read_only: bool) -> None:
    """``source`` (a directory or a file, resolved already) bound at ``share``/``name``."""
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
        point = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
        try:
            syscalls.mount(str(source), f"/proc/self/fd/{point}", None, syscalls.MS_BIND)
        finally:
            os.close(point)
        if read_only:  # held on the host too: a guest that ignores its own read-only mount writes nothing
            mounted = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
            try:
                syscalls.mount(None, f"/proc/self/fd/{mounted}", None, syscalls.MS_BIND | syscalls.MS_REMOUNT
                               | syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV)
            finally:
                os.close(mounted)
    except BaseException:
        unbind(share, [name])
        raise
    finally:
        os.close(directory)


def unbind(share: Path, names: list[str]) -> None:
    """Idempotent: each entry unmounted (lazily, never through a link) and removed."""
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
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StateError(f"cannot remove {path}: {exc.strerror}") from None
        finally:
            os.close(directory)


def unbind_container(share: Path, container_id: str) -> None:
    """The entries of one container (by their names' prefix: whatever the guest made under one goes too)."""
    try:
        names = os.listdir(share)
    except FileNotFoundError:
        return
    unbind(share, [n for n in names if n.startswith(entry_name(container_id, 0)[:-1])])


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
