"""Capabilities: names and numbers, ``process.capabilities``, and the steps that apply them in the container's init.

The init runs the steps around its change of user, as runc does:

    sets = caps.parse(config["process"].get("capabilities"))
    caps.drop_bounding(sets.bounding)      # while still fully privileged
    caps.keep_caps_across_setuid()         # or setresuid() would empty the permitted set
    ... setgroups, setresgid, setresuid ...
    caps.apply(sets)                       # capset, then the ambient set

Names the kernel does not know (or that this kernel lacks, beyond cap_last_cap) are ignored and reported in
``CapabilitySets.ignored``: runc 1.1 warns "ignoring unknown or unavailable capabilities" and goes on.
"""

from __future__ import annotations

import errno
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from micropod import syscalls
from micropod.errors import OciRuntimeError, SpecError

# Index = the kernel's number (<linux/capability.h>).
ALL_CAPS: tuple[str, ...] = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN",
    "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
NUMBERS: dict[str, int] = {name: number for number, name in enumerate(ALL_CAPS)}

# What docker gives a container that is not --privileged (moby's oci/caps defaults), in moby's order.
DOCKER_DEFAULT_CAPS: tuple[str, ...] = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

SET_NAMES = ("bounding", "effective", "permitted", "inheritable", "ambient")

_last_cap: int | None = None


def last_cap() -> int:
    """The highest capability this kernel knows (/proc/sys/kernel/cap_last_cap)."""
    global _last_cap
    if _last_cap is None:
        try:
            with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
                _last_cap = min(int(f.read()), len(ALL_CAPS) - 1)
        except (OSError, ValueError):
            # No /proc yet: the numbers we know are the best guess, and PR_CAPBSET_* refuse the rest with EINVAL.
            _last_cap = len(ALL_CAPS) - 1
    return _last_cap


def number(name: str) -> int | None:
    """The kernel's number for ``name`` (exact, upper case, as in config.json), or None if this kernel lacks it."""
    value = NUMBERS.get(name)
    return value if value is not None and value <= last_cap() else None


def available() -> tuple[str, ...]:
    """Every capability this kernel knows, in number order: what ``--privileged`` grants."""
    return ALL_CAPS[: last_cap() + 1]


def mask(numbers: Iterable[int]) -> int:
    result = 0
    for value in numbers:
        result |= 1 << value
    return result


def names(bits: int) -> list[str]:
    """The names in a 64-bit set as /proc/PID/status shows it (CapEff: ...)."""
    return [name for value, name in enumerate(ALL_CAPS) if bits >> value & 1]


@dataclass(frozen=True)
class CapabilitySets:
    bounding: frozenset[int] = frozenset()
    effective: frozenset[int] = frozenset()
    permitted: frozenset[int] = frozenset()
    inheritable: frozenset[int] = frozenset()
    ambient: frozenset[int] = frozenset()
    ignored: tuple[str, ...] = ()  # unknown or unavailable names, for the caller's warning


def parse(capabilities: Mapping[str, Any] | None, field: str = "process.capabilities") -> CapabilitySets:
    """``process.capabilities`` as numbers; SpecError names the bad field.

    An absent object or set means an empty one: runc 1.1 gives such a process no capabilities at all.
    """
    if capabilities is None:
        return CapabilitySets()
    if not isinstance(capabilities, Mapping):
        raise SpecError(field, "must be an object")
    sets: dict[str, frozenset[int]] = {}
    ignored: list[str] = []
    for set_name in SET_NAMES:
        entries = capabilities.get(set_name)
        if entries is None:
            sets[set_name] = frozenset()
            continue
        if not isinstance(entries, list):
            raise SpecError(f"{field}.{set_name}", "must be an array of capability names")
        numbers: set[int] = set()
        for index, name in enumerate(entries):
            if not isinstance(name, str):
                raise SpecError(f"{field}.{set_name}[{index}]", "must be a string")
            value = number(name)
            if value is None:
                if name not in ignored:
                    ignored.append(name)
                continue
            numbers.add(value)
        sets[set_name] = frozenset(numbers)
    return CapabilitySets(sets["bounding"], sets["effective"], sets["permitted"], sets["inheritable"],
                          sets["ambient"], tuple(ignored))


def validate(capabilities: Mapping[str, Any] | None, field: str = "process.capabilities") -> None:
    parse(capabilities, field)


def drop_bounding(keep: Collection[int]) -> None:
    """Drop every capability but ``keep`` from the bounding set; needs CAP_SETPCAP, so call it before setuid.

    A capability the set lacks already is not dropped again, so a process without CAP_SETPCAP succeeds when
    there is nothing left to drop, and fails (rather than silently keeping more) when there is.
    """
    try:
        for cap in range(last_cap() + 1):
            if cap not in keep and syscalls.capbset_read(cap):
                syscalls.capbset_drop(cap)
    except OSError as exc:
        raise OciRuntimeError(f"unable to apply bounding set: {exc.strerror}") from exc


def keep_caps_across_setuid() -> None:
    """PR_SET_KEEPCAPS: the permitted set survives the coming change from uid 0; apply() clears it again."""
    try:
        syscalls.set_keepcaps(True)
    except OSError as exc:
        raise OciRuntimeError(f"unable to set keep caps: {exc.strerror}") from exc


def apply(sets: CapabilitySets) -> None:
    """Set the effective, permitted and inheritable sets (capset), then the ambient set.

    Run after the change of user. An ambient capability that is not both permitted and inheritable cannot be
    raised; runc 1.1 skips it silently, and so does this, since skipping only ever grants less.
    """
    try:
        syscalls.set_keepcaps(False)
        syscalls.capset(mask(sets.effective), mask(sets.permitted), mask(sets.inheritable))
    except OSError as exc:
        raise OciRuntimeError(f"unable to apply caps: {exc.strerror}") from exc
    try:
        syscalls.ambient_clear_all()
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: a kernel before 4.3, which has no ambient set
            raise OciRuntimeError(f"unable to apply caps: {exc.strerror}") from exc
        return
    for cap in sorted(sets.ambient):
        try:
            syscalls.ambient_raise(cap)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EINVAL):
                raise OciRuntimeError(f"unable to apply caps: {exc.strerror}") from exc
