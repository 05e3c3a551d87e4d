"""Resolve docker's ``--user`` against the container's own /etc/passwd and /etc/group.

Follows runc's GetExecUser, which docker uses: ``user[:group]``, each a name or a number. A name must
exist; a number need not (it then runs with gid 0 and HOME=/ unless the group is given). When the
user has a passwd entry, the supplementary groups are the /etc/group entries that list its name.
Called in the container process after chroot, so the paths are the container's.
"""

from __future__ import annotations

import os
import stat

_MAX_ID = 2**31 - 1


class UserError(Exception):
    """``--user`` names something the container does not have."""


class ExecUser:
    __slots__ = ("gid", "groups", "home", "uid")

    def __init__(self, uid: int, gid: int, groups: list[int], home: str) -> None:
        self.uid = uid
        self.gid = gid
        self.groups = groups
        self.home = home

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExecUser) and (self.uid, self.gid, self.groups, self.home) == (
            other.uid, other.gid, other.groups, other.home
        )

    def __repr__(self) -> str:
        return f"ExecUser(uid={self.uid}, gid={self.gid}, groups={self.groups}, home={self.home!r})"


MAX_FILE = 4 << 20


def _read_regular(path: str) -> str:
    """The image's file, read as the agent (PID 1) may: never through a final symlink, never a device or a
    fifo that would block or stream without end (ENOENT for those, as if absent), at most MAX_FILE bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileNotFoundError(path)
        return os.read(fd, MAX_FILE).decode("utf-8", errors="surrogateescape")
    finally:
        os.close(fd)


def _entries(path: str, min_fields: int) -> list[list[str]]:
    try:
        lines = _read_regular(path).splitlines()
    except (FileNotFoundError, OSError):
        return []
    entries = []
    for line in lines:
        fields = line.split(":")
        if line.strip() and not line.startswith("#") and len(fields) >= min_fields:
            entries.append(fields)
    return entries


def _number(text: str) -> int | None:
    if not text.isdigit() or not text.isascii():
        return None
    value = int(text)
    if value > _MAX_ID:
        raise UserError(f"uids and gids must be in range 0-{_MAX_ID}")
    return value


def resolve(spec: str, passwd: str = "/etc/passwd", group: str = "/etc/group") -> ExecUser:
    user_arg, _, group_arg = spec.partition(":")
    uid, gid, home, name = 0, 0, "/", ""
    wanted = user_arg or "0"  # no user means root, with root's passwd entry if there is one
    number = _number(wanted)
    for fields in _entries(passwd, 4):
        if fields[0] == wanted or (number is not None and fields[2] == wanted):
            name = fields[0]
            uid = _number(fields[2]) or 0
            gid = _number(fields[3]) or 0
            home = fields[5] if len(fields) > 5 and fields[5] else "/"
            break
    else:
        if number is None:
            raise UserError(f"unable to find user {wanted}: no matching entries in passwd file")
        uid = number

    groups: list[int] = []
    group_entries = _entries(group, 3) if name or group_arg else []
    if group_arg:
        number = _number(group_arg)
        for fields in group_entries:
            if fields[0] == group_arg or (number is not None and fields[2] == group_arg):
                gid = _number(fields[2]) or 0
                break
        else:
            if number is None:
                raise UserError(f"unable to find group {group_arg}: no matching entries in group file")
            gid = number
    if name:
        for fields in group_entries:
            members = fields[3].split(",") if len(fields) > 3 else []
            member_gid = _number(fields[2])
            if name in members and member_gid is not None and member_gid not in groups:
                groups.append(member_gid)
    return ExecUser(uid, gid, groups, home)
