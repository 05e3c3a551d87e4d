"""The ``linux`` section of config.json (runtime-spec 1.2 config-linux.md), the field checkers, and the tables
(namespaces, rlimits, mount options) that the rest of micropod-runtime shares.

Paths inside the container (device paths, masked paths) stay ``str``: they mean nothing on the host until
the init resolves them beneath the rootfs. Paths in the runtime's namespace (a namespace to join) are ``Path``.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from micropod.errors import SpecError
from micropod.runtime.spec_mounts import ROOTFS_PROPAGATIONS

U32 = 2**32 - 1
U64 = 2**64 - 1
I64 = (-(2**63), 2**63 - 1)


# --- field checkers: each takes the value and the field's path, and returns it typed or raises SpecError ---


def _required(value: object, field: str) -> None:
    # JSON null counts as absent, as it does for Go's encoding/json and so for runc.
    if value is None:
        raise SpecError(field, "is required")


def want_obj(value: object, field: str) -> dict[str, Any]:
    _required(value, field)
    if not isinstance(value, dict):
        raise SpecError(field, "must be an object")
    return value


def want_list(value: object, field: str) -> list[Any]:
    _required(value, field)
    if not isinstance(value, list):
        raise SpecError(field, "must be a list")
    return value


def want_str(value: object, field: str) -> str:
    _required(value, field)
    if not isinstance(value, str):
        raise SpecError(field, "must be a string")
    if "\0" in value:
        raise SpecError(field, "must not contain NUL bytes")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise SpecError(field, "must be valid UTF-8 (it holds a lone surrogate)") from None
    return value


def want_bool(value: object, field: str) -> bool:
    _required(value, field)
    if not isinstance(value, bool):
        raise SpecError(field, "must be true or false")
    return value


def want_int(value: object, field: str, lo: int = 0, hi: int = U32) -> int:
    _required(value, field)
    # bool is an int in Python, and JSON's 1.0 is a float: neither is what the spec means by an integer.
    if not isinstance(value, int) or isinstance(value, bool):
        raise SpecError(field, "must be an integer")
    if not lo <= value <= hi:
        raise SpecError(field, f"must be between {lo} and {hi}, got {value}")
    return value


def want_str_list(value: object, field: str) -> tuple[str, ...]:
    return tuple(want_str(item, f"{field}[{i}]") for i, item in enumerate(want_list(value, field)))


def want_abs(value: object, field: str) -> str:
    path = want_str(value, field)
    if not path.startswith("/"):
        raise SpecError(field, f"must be an absolute path, got {path!r}")
    return path


def want_env(value: object, field: str) -> tuple[str, ...]:
    env = want_str_list(value, field)
    for i, entry in enumerate(env):
        if "=" not in entry or entry.startswith("="):
            raise SpecError(f"{field}[{i}]", f"must be a KEY=VALUE string, got {entry!r}")
    return env


def want_str_map(value: object, field: str) -> dict[str, str]:
    mapping = want_obj(value, field)
    for key, item in mapping.items():
        if not key:
            raise SpecError(field, "keys must not be empty")
        want_str(key, f"{field} key {key!r}")
        want_str(item, f"{field}[{key!r}]")
    return dict(mapping)


# --- shared tables ---


@dataclass(frozen=True)
class NamespaceType:
    clone_flag: int
    proc_name: str  # the entry under /proc/<pid>/ns/


NAMESPACE_TYPES: dict[str, NamespaceType] = {
    "pid": NamespaceType(0x20000000, "pid"),
    "network": NamespaceType(0x40000000, "net"),
    "mount": NamespaceType(0x00020000, "mnt"),
    "ipc": NamespaceType(0x08000000, "ipc"),
    "uts": NamespaceType(0x04000000, "uts"),
    "user": NamespaceType(0x10000000, "user"),
    "cgroup": NamespaceType(0x02000000, "cgroup"),
    "time": NamespaceType(0x00000080, "time"),
}

_RLIMIT_NAMES = "CPU FSIZE DATA STACK CORE RSS NPROC NOFILE MEMLOCK AS LOCKS SIGPENDING MSGQUEUE NICE RTPRIO RTTIME"
RLIMITS: dict[str, int] = {f"RLIMIT_{name}": number for number, name in enumerate(_RLIMIT_NAMES.split())}

# --- the linux section ---

DEVICE_TYPES = {"c", "b", "u", "p"}
DEVICE_OPTIONALS = ("fileMode", "uid", "gid")
TIME_CLOCKS = {"monotonic", "boottime"}
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), <linux/nsfs.h>
MAX_ID_MAPPINGS = 340  # the kernel's limit per map since 4.15
# runc's list of sysctls that live in a namespace (validator.go): anything else would change the host.
IPC_SYSCTLS = {
    "kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem",
    "kernel.shmall", "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced",
}  # fmt: skip
# Dots or slashes between non-empty names: nothing that could climb out of /proc/sys.
SYSCTL_NAME = re.compile(r"[\w@:+-]+(?:[./][\w@:+-]+)+", re.ASCII)


@dataclass(frozen=True)
class Namespace:
    type: str
    path: Path | None = None  # join this one instead of creating it


@dataclass(frozen=True)
class IdMapping:
    container_id: int
    host_id: int
    size: int


@dataclass(frozen=True)
class Device:
    type: str
    path: str
    major: int = 0
    minor: int = 0
    file_mode: int | None = None
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class TimeOffset:
    secs: int = 0
    nanosecs: int = 0


@dataclass(frozen=True)
class Linux:
    namespaces: tuple[Namespace, ...] = ()
    uid_mappings: tuple[IdMapping, ...] = ()
    gid_mappings: tuple[IdMapping, ...] = ()
    devices: tuple[Device, ...] = ()
    cgroups_path: str | None = None
    resources: dict[str, Any] | None = None  # checked by micropod.runtime.cgroups
    seccomp: dict[str, Any] | None = None  # checked by micropod.runtime.seccomp
    rootfs_propagation: str | None = None
    masked_paths: tuple[str, ...] = ()
    readonly_paths: tuple[str, ...] = ()
    sysctl: dict[str, str] = field(default_factory=dict)
    time_offsets: dict[str, TimeOffset] = field(default_factory=dict)
    personality: str | None = None  # "LINUX" or "LINUX32"

    def namespace(self, type: str) -> Namespace | None:
        return next((ns for ns in self.namespaces if ns.type == type), None)

    def creates(self, type: str) -> bool:
        """Whether the container gets a new namespace of this type (listed, and no path to join)."""
        ns = self.namespace(type)
        return ns is not None and ns.path is None


def parse_linux(value: object, warnings: list[str]) -> Linux:
    if value is None:
        return Linux()
    linux = want_obj(value, "linux")
    namespaces = _namespaces(linux.get("namespaces"))
    types = {ns.type: ns for ns in namespaces}
    uid_mappings = _mappings(linux.get("uidMappings"), "linux.uidMappings")
    gid_mappings = _mappings(linux.get("gidMappings"), "linux.gidMappings")
    if "user" not in types and (uid_mappings or gid_mappings):
        which = "linux.uidMappings" if uid_mappings else "linux.gidMappings"
        raise SpecError(which, "needs a user namespace in linux.namespaces")
    if "user" in types and types["user"].path is None:
        if not uid_mappings:
            raise SpecError("linux.uidMappings", "a new user namespace needs uid mappings")
        if not gid_mappings:
            raise SpecError("linux.gidMappings", "a new user namespace needs gid mappings")
    resources = linux.get("resources")
    seccomp = linux.get("seccomp")
    propagation = linux.get("rootfsPropagation")
    if propagation is not None and want_str(propagation, "linux.rootfsPropagation") not in ROOTFS_PROPAGATIONS:
        raise SpecError("linux.rootfsPropagation", f"unknown propagation {propagation!r}")
    masked = want_abs_list(linux.get("maskedPaths"), "linux.maskedPaths")
    readonly = want_abs_list(linux.get("readonlyPaths"), "linux.readonlyPaths")
    if (masked or readonly) and "mount" not in types:
        raise SpecError("linux.maskedPaths" if masked else "linux.readonlyPaths", "needs a mount namespace")
    for key in ("mountLabel", "intelRdt"):
        if linux.get(key) is not None:
            warnings.append(f"linux.{key} is ignored: micropod-runtime does not support it")
    return Linux(
        namespaces=namespaces,
        uid_mappings=uid_mappings,
        gid_mappings=gid_mappings,
        devices=_devices(linux.get("devices")),
        cgroups_path=_cgroups_path(linux.get("cgroupsPath")),
        resources=None if resources is None else want_obj(resources, "linux.resources"),
        seccomp=None if seccomp is None else want_obj(seccomp, "linux.seccomp"),
        rootfs_propagation=propagation,
        masked_paths=masked,
        readonly_paths=readonly,
        sysctl=_sysctl(linux.get("sysctl"), types),
        time_offsets=_time_offsets(linux.get("timeOffsets"), types),
        personality=_personality(linux.get("personality")),
    )


def want_abs_list(value: object, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    return tuple(want_abs(item, f"{field}[{i}]") for i, item in enumerate(want_list(value, field)))


def _namespaces(value: object) -> tuple[Namespace, ...]:
    if value is None:
        return ()
    seen: dict[str, int] = {}
    namespaces = []
    for i, item in enumerate(want_list(value, "linux.namespaces")):
        where = f"linux.namespaces[{i}]"
        entry = want_obj(item, where)
        kind = want_str(entry.get("type"), f"{where}.type")
        if kind not in NAMESPACE_TYPES:
            raise SpecError(f"{where}.type", f"unknown namespace type {kind!r}")
        if kind in seen:
            raise SpecError(f"{where}.type", f"duplicate namespace type {kind!r} (also linux.namespaces[{seen[kind]}])")
        seen[kind] = i
        path = entry.get("path")
        joined = Path(want_abs(path, f"{where}.path")) if path not in (None, "") else None
        if joined is not None:
            _check_namespace_file(joined, kind, f"{where}.path")
        namespaces.append(Namespace(kind, joined))
    return tuple(namespaces)


def _check_namespace_file(path: Path, kind: str, field: str) -> None:
    """The spec's "MUST generate an error if path is not associated with a namespace of type type"; runc 1.1
    only fails later, in setns, with a bare EINVAL."""
    try:
        # stat first: opening what is not a regular file (a FIFO, /dev/watchdog) could block or act.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise SpecError(field, f"{path} is not a namespace file")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise SpecError(field, f"{path} does not exist") from None
    except OSError as exc:
        raise SpecError(field, f"{path}: {exc.strerror}") from exc
    try:
        found = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        raise SpecError(field, f"{path} is not a namespace file") from None
    finally:
        os.close(fd)
    if found != NAMESPACE_TYPES[kind].clone_flag:
        other = next((name for name, t in NAMESPACE_TYPES.items() if t.clone_flag == found), hex(found))
        raise SpecError(field, f"{path} is a {other} namespace, not a {kind} one")


def _mappings(value: object, field: str) -> tuple[IdMapping, ...]:
    if value is None:
        return ()
    items = want_list(value, field)
    if len(items) > MAX_ID_MAPPINGS:
        raise SpecError(field, f"has {len(items)} entries; the kernel allows at most {MAX_ID_MAPPINGS}")
    mappings: list[IdMapping] = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        entry = want_obj(item, where)
        ids = [want_int(entry.get(k), f"{where}.{k}") for k in ("containerID", "hostID", "size")]
        mapping = IdMapping(*ids)
        if mapping.size == 0:
            raise SpecError(f"{where}.size", "must be at least 1")
        for start in (mapping.container_id, mapping.host_id):
            if start + mapping.size - 1 > U32:
                raise SpecError(where, f"range {start}+{mapping.size} goes past {U32}")
        for j, other in enumerate(mappings):
            # The kernel refuses overlapping ranges on either side with a bare EINVAL.
            for mine, theirs, side in ((mapping.container_id, other.container_id, "container"),
                                       (mapping.host_id, other.host_id, "host")):  # fmt: skip
                if mine < theirs + other.size and theirs < mine + mapping.size:
                    raise SpecError(where, f"{side} ids overlap {field}[{j}]")
        mappings.append(mapping)
    return tuple(mappings)


def _devices(value: object) -> tuple[Device, ...]:
    if value is None:
        return ()
    devices = []
    for i, item in enumerate(want_list(value, "linux.devices")):
        where = f"linux.devices[{i}]"
        entry = want_obj(item, where)
        kind = want_str(entry.get("type"), f"{where}.type")
        if kind not in DEVICE_TYPES:
            raise SpecError(f"{where}.type", f"unknown device type {kind!r} (c, b, u or p)")
        path = want_abs(entry.get("path"), f"{where}.path")
        numbers = []
        for key in ("major", "minor"):
            if entry.get(key) is None and kind != "p":
                raise SpecError(f"{where}.{key}", "is required for a device of type " + repr(kind))
            numbers.append(0 if entry.get(key) is None else want_int(entry[key], f"{where}.{key}", 0, U32))
        optional = [None if entry.get(k) is None else want_int(entry[k], f"{where}.{k}") for k in DEVICE_OPTIONALS]
        devices.append(Device(kind, path, numbers[0], numbers[1], *optional))
    return tuple(devices)


def _cgroups_path(value: object) -> str | None:
    if value is None or value == "":
        return None
    raw = want_str(value, "linux.cgroupsPath")
    # As runc's CleanPath: ".." is resolved lexically against "/", so no value climbs out of the hierarchy.
    cleaned = os.path.normpath("/" + raw.lstrip("/"))
    return cleaned if raw.startswith("/") else cleaned.lstrip("/") or None


def _sysctl(value: object, types: dict[str, Namespace]) -> dict[str, str]:
    if value is None:
        return {}
    sysctl = want_str_map(value, "linux.sysctl")
    for key in sysctl:
        where = f"linux.sysctl[{key!r}]"
        if not SYSCTL_NAME.fullmatch(key):
            raise SpecError(where, "is not a sysctl name")
        if key == "kernel.hostname":
            raise SpecError(where, "conflicts with the hostname field; set that instead")
        kind = sysctl_namespace(key)
        if kind is None:
            raise SpecError(where, "is not in a namespace of the container (it would change the host's)")
        _own_namespace(types, kind, where)
    return sysctl


def sysctl_namespace(key: str) -> str | None:
    """The namespace whose value the sysctl ``key`` is (runc's rule), or None: the kernel's own."""
    if key in IPC_SYSCTLS or key.startswith("fs.mqueue."):
        return "ipc"
    if key.startswith("net."):
        return "network"
    return "uts" if key in ("kernel.domainname", "kernel.hostname") else None


def _own_namespace(types: dict[str, Namespace], kind: str, where: str) -> None:
    """A namespaced sysctl needs the container's own namespace: a new one, or a joined one that is not the
    runtime's (runc checks that for the network namespace only)."""
    ns = types.get(kind)
    if ns is not None and ns.path is not None:
        joined, ours = os.stat(ns.path), os.stat(f"/proc/self/ns/{NAMESPACE_TYPES[kind].proc_name}")
        if (joined.st_dev, joined.st_ino) == (ours.st_dev, ours.st_ino):
            ns = None
    if ns is None:
        raise SpecError(where, f"needs the container's own {kind} namespace (else it changes the host's)")


def _time_offsets(value: object, types: dict[str, Namespace]) -> dict[str, TimeOffset]:
    if value is None:
        return {}
    offsets = {}
    for clock, item in want_obj(value, "linux.timeOffsets").items():
        where = f"linux.timeOffsets[{clock!r}]"
        if clock not in TIME_CLOCKS:
            raise SpecError(where, "unknown clock (monotonic or boottime)")
        entry = want_obj(item, where)
        secs = entry.get("secs")
        nanos = entry.get("nanosecs")
        offsets[clock] = TimeOffset(
            0 if secs is None else want_int(secs, f"{where}.secs", *I64),
            0 if nanos is None else want_int(nanos, f"{where}.nanosecs", 0, 999_999_999),
        )
    if offsets and not ("time" in types and types["time"].path is None):
        raise SpecError("linux.timeOffsets", "needs a new time namespace in linux.namespaces")
    return offsets


def _personality(value: object) -> str | None:
    if value is None:
        return None
    entry = want_obj(value, "linux.personality")
    domain = want_str(entry.get("domain"), "linux.personality.domain")
    if domain not in ("LINUX", "LINUX32"):
        raise SpecError("linux.personality.domain", f"unknown domain {domain!r} (LINUX or LINUX32)")
    if want_str_list(entry.get("flags") or [], "linux.personality.flags"):
        raise SpecError("linux.personality.flags", "no personality flags are supported")
    return domain
