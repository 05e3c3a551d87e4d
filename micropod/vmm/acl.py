"""Read access to one file for one uid, as a POSIX ACL entry (the ``system.posix_acl_access`` xattr), and its
removal: how a jailed Firecracker, running as its VM's own uid, reads the read-only disks hard-linked into its
jail (an image's base is shared by every VM of that image and stays root's, 0600, for everyone else)."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from pathlib import Path

from micropod.errors import VmmError

_XATTR = "system.posix_acl_access"
_VERSION = 2
_ENTRY = struct.Struct("<HHI")
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF
READ = 4


def _entries(fd: int, mode: int) -> dict[tuple[int, int], int]:
    """(tag, id) -> permissions: the file's ACL, or the one its mode stands for."""
    try:
        raw = os.getxattr(fd, _XATTR)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
        return {(USER_OBJ, _NO_ID): (mode >> 6) & 7, (GROUP_OBJ, _NO_ID): (mode >> 3) & 7, (OTHER, _NO_ID): mode & 7}
    if len(raw) < 4 or struct.unpack_from("<I", raw)[0] != _VERSION or (len(raw) - 4) % _ENTRY.size:
        raise VmmError("a disk's ACL is not one micropod can read")
    return {(tag, ident): perm for tag, perm, ident in _ENTRY.iter_unpack(raw[4:])}


def _write(fd: int, entries: dict[tuple[int, int], int]) -> None:
    named = [perm for (tag, _), perm in entries.items() if tag in (USER, GROUP)]
    if not named:
        entries.pop((MASK, _NO_ID), None)
        os.removexattr(fd, _XATTR)
        os.fchmod(fd, (entries[(USER_OBJ, _NO_ID)] << 6) | (entries[(GROUP_OBJ, _NO_ID)] << 3)
                  | entries[(OTHER, _NO_ID)])
        return
    mask = entries[(GROUP_OBJ, _NO_ID)]
    for perm in named:
        mask |= perm
    entries[(MASK, _NO_ID)] = mask
    body = b"".join(_ENTRY.pack(tag, perm, ident) for (tag, ident), perm in sorted(entries.items()))
    os.setxattr(fd, _XATTR, struct.pack("<I", _VERSION) + body)


def _edit(path: Path, uid: int, grant: bool) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # monitors of other VMs of the same image edit the same ACL
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise VmmError(f"{path} is not a regular file")
        entries = _entries(fd, st.st_mode)
        if grant:
            entries[(USER, uid)] = entries.get((USER, uid), 0) | READ
        elif entries.pop((USER, uid), None) is None:
            return
        _write(fd, entries)
    except OSError as exc:
        raise VmmError(f"cannot {'grant' if grant else 'revoke'} uid {uid} read access to {path}: "
                       f"{exc.strerror}", hint="the state root's filesystem needs POSIX ACLs") from exc
    finally:
        os.close(fd)


def grant_read(path: Path, uid: int) -> None:
    _edit(path, uid, grant=True)


def revoke(path: Path, uid: int) -> None:
    _edit(path, uid, grant=False)
