"""Entering namespaces: joining ones named by path, creating the rest, in the order that works.

A new user namespace comes first, since the other new namespaces then belong to it, and the runtime writes its
uid and gid maps from outside. A joined user namespace comes first too, since joining the others needs the
capabilities it grants. The pid and time namespaces apply to children: the caller forks after ``enter``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from micropod import syscalls as sc
from micropod.errors import OciRuntimeError

FLAGS = {
    "pid": sc.CLONE_NEWPID, "network": sc.CLONE_NEWNET, "mount": sc.CLONE_NEWNS, "ipc": sc.CLONE_NEWIPC,
    "uts": sc.CLONE_NEWUTS, "user": sc.CLONE_NEWUSER, "cgroup": sc.CLONE_NEWCGROUP, "time": sc.CLONE_NEWTIME,
}
PROC_NAMES = {"pid": "pid", "network": "net", "mount": "mnt", "ipc": "ipc", "uts": "uts", "user": "user",
              "cgroup": "cgroup", "time": "time"}
# Joining order for exec: user first (it grants the rest), mount late (paths stop resolving on the host).
JOIN_ORDER = ("user", "ipc", "uts", "network", "pid", "time", "cgroup", "mount")


@dataclass(frozen=True)
class NamespacePlan:
    create: tuple[str, ...]
    join: tuple[tuple[str, str], ...]  # (type, path)

    @classmethod
    def from_config(cls, namespaces: Sequence[Mapping[str, Any]]) -> NamespacePlan:
        create, join = [], []
        for ns in namespaces:
            kind = str(ns["type"])
            if ns.get("path"):
                join.append((kind, str(ns["path"])))
            else:
                create.append(kind)
        return cls(tuple(create), tuple(join))

    def has(self, kind: str) -> bool:
        return kind in self.create or any(k == kind for k, _ in self.join)

    @property
    def new_user(self) -> bool:
        return "user" in self.create

    def open_joined(self) -> list[tuple[str, int]]:
        """The fds of the namespaces to join, opened before any is entered; user first."""
        ordered = sorted(self.join, key=lambda item: JOIN_ORDER.index(item[0]))
        opened = []
        for kind, path in ordered:
            try:
                opened.append((kind, os.open(path, os.O_RDONLY | os.O_CLOEXEC)))
            except OSError as exc:
                raise OciRuntimeError(f"linux.namespaces: {kind} namespace {path}: {exc.strerror}") from None
        return opened


def join(opened: Sequence[tuple[str, int]]) -> None:
    for kind, fd in opened:
        try:
            sc.setns(fd, FLAGS[kind])
        except OSError as exc:
            raise OciRuntimeError(f"joining the {kind} namespace: {exc.strerror}") from None
        finally:
            os.close(fd)


def unshare(kinds: Sequence[str]) -> None:
    flags = 0
    for kind in kinds:
        flags |= FLAGS[kind]
    if flags:
        try:
            sc.unshare(flags)
        except OSError as exc:
            raise OciRuntimeError(f"creating namespaces {', '.join(kinds)}: {exc.strerror}") from None


def write_id_maps(pid: int, linux: Mapping[str, Any]) -> None:
    """The new user namespace's maps, written by the runtime (outside it) for its first process."""
    for kind, key in (("uid", "uidMappings"), ("gid", "gidMappings")):
        lines = "".join(f"{int(m['containerID'])} {int(m['hostID'])} {int(m['size'])}\n"
                        for m in linux.get(key) or [])
        if not lines:
            continue
        try:
            with open(f"/proc/{pid}/{kind}_map", "w") as f:
                f.write(lines)
        except OSError as exc:
            raise OciRuntimeError(f"linux.{key}: writing /proc/{pid}/{kind}_map: {exc.strerror}") from None


def write_time_offsets(offsets: Mapping[str, Any]) -> None:
    """linux.timeOffsets, for a new time namespace, before its first process exists."""
    clocks = {"monotonic": "monotonic", "boottime": "boottime"}
    lines = "".join(f"{clocks[name]} {int(v.get('secs', 0))} {int(v.get('nanosecs', 0))}\n"
                    for name, v in offsets.items() if name in clocks)
    if lines:
        with open("/proc/self/timens_offsets", "w") as f:
            f.write(lines)


def of_process(pid: int, kinds: Sequence[str]) -> list[tuple[str, str]]:
    """The namespaces of a running container's init, for exec to join."""
    return [(kind, f"/proc/{pid}/ns/{PROC_NAMES[kind]}") for kind in kinds]
