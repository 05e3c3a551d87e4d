"""Device access rules (``linux.resources.devices``): one model for both cgroup versions.

The rules are folded in order into a ``DevicePolicy`` (a default plus exceptions), as runc's devices
emulator does, so that v1 (devices.allow/devices.deny) and v2 (an eBPF program) enforce the same thing.
Starting point is "deny everything"; a type "a" rule resets the default. Removing part of a wildcard
exception is refused: cgroup v1 would silently ignore it, leaving more allowed than asked.

Standard library only.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from micropod.errors import SpecError

WILDCARD = -1
_MAX_DEVICE_NUMBER = (1 << 31) - 1  # the eBPF filter compares with a signed 32-bit immediate
_ACCESS = "rwm"

Key = tuple[str, int, int]  # (type "b" or "c", major, minor); -1 is "*"


@dataclass(frozen=True)
class DeviceRule:
    allow: bool
    type: str  # "a", "b" or "c"
    major: int = WILDCARD
    minor: int = WILDCARD
    access: str = _ACCESS  # a subset of "rwm", in that order

    def cgroup_v1_line(self) -> str:
        """The line for devices.allow / devices.deny, e.g. ``c 1:3 rwm``."""
        if self.type == "a":
            return "a"
        return f"{self.type} {_number(self.major)}:{_number(self.minor)} {self.access}"


def _number(value: int) -> str:
    return "*" if value == WILDCARD else str(value)


def _norm_access(chars: frozenset[str] | str) -> str:
    return "".join(c for c in _ACCESS if c in chars)


# runc 1.1's AllowedDevices, with the node each rule is for: appended after the config's own rules.
_DEFAULTS: tuple[tuple[str | None, dict[str, Any]], ...] = (
    (None, {"allow": True, "type": "c", "access": "m"}),  # mknod of any node; opening it is another matter
    (None, {"allow": True, "type": "b", "access": "m"}),
    ("/dev/null", {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"}),
    ("/dev/random", {"allow": True, "type": "c", "major": 1, "minor": 8, "access": "rwm"}),
    ("/dev/full", {"allow": True, "type": "c", "major": 1, "minor": 7, "access": "rwm"}),
    ("/dev/tty", {"allow": True, "type": "c", "major": 5, "minor": 0, "access": "rwm"}),
    ("/dev/zero", {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"}),
    ("/dev/urandom", {"allow": True, "type": "c", "major": 1, "minor": 9, "access": "rwm"}),
    (None, {"allow": True, "type": "c", "major": 136, "access": "rwm"}),  # /dev/pts/*
    (None, {"allow": True, "type": "c", "major": 5, "minor": 2, "access": "rwm"}),  # /dev/ptmx
    (None, {"allow": True, "type": "c", "major": 10, "minor": 200, "access": "rwm"}),  # /dev/net/tun
)
DEFAULT_ALLOWED_DEVICES: tuple[dict[str, Any], ...] = tuple(rule for _, rule in _DEFAULTS)


def container_device_rules(config_rules: Sequence[Any] | None, linux_devices: Sequence[Any] = ()) -> list[Any]:
    """What runc puts in the devices cgroup: ``linux.resources.devices`` (absent is none), then its defaults,
    less those for a node that ``linux.devices`` redefines. A node in ``linux.devices`` is not allowed by
    that alone: as with runc, the config must allow it in ``linux.resources.devices``."""
    redefined = {device.get("path") for device in linux_devices if isinstance(device, Mapping)}
    return [*(config_rules or []), *(rule for path, rule in _DEFAULTS if path is None or path not in redefined)]


def parse_device_rules(value: object, field: str = "linux.resources.devices") -> list[DeviceRule]:
    """The spec's device cgroup entries, checked; absent type/major/minor mean "all" as in the spec."""
    if not isinstance(value, list):
        raise SpecError(field, "must be an array")
    rules = []
    for index, entry in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(entry, Mapping):
            raise SpecError(where, "must be an object")
        allow = entry.get("allow")
        if not isinstance(allow, bool):
            raise SpecError(f"{where}.allow", "is required and must be a boolean")
        kind = entry.get("type", "a")
        if kind not in ("a", "b", "c"):
            raise SpecError(f"{where}.type", f"{kind!r} is not one of 'a', 'b', 'c'")
        numbers = []
        for name in ("major", "minor"):
            number = entry.get(name, WILDCARD)
            number = WILDCARD if number is None else number
            if isinstance(number, bool) or not isinstance(number, int) or not -1 <= number <= _MAX_DEVICE_NUMBER:
                raise SpecError(f"{where}.{name}", f"must be an integer from 0 to {_MAX_DEVICE_NUMBER}")
            numbers.append(number)
        access = entry.get("access", _ACCESS)
        access = _ACCESS if access is None else access
        if not isinstance(access, str) or not re.fullmatch(r"[rwm]*", access):
            raise SpecError(f"{where}.access", f"{access!r} must be made of the letters r, w and m")
        rules.append(DeviceRule(allow, kind, numbers[0], numbers[1], _norm_access(access)))
    return rules


@dataclass
class DevicePolicy:
    """What a devices cgroup allows: the default, and the exceptions to it with their access letters."""

    default_allow: bool = False
    exceptions: dict[Key, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def from_rules(cls, rules: Sequence[DeviceRule], field: str = "linux.resources.devices") -> DevicePolicy:
        policy = cls()
        for index, rule in enumerate(rules):
            try:
                policy.apply(rule)
            except ValueError as exc:
                raise SpecError(f"{field}[{index}]", str(exc)) from None
        return policy

    @classmethod
    def from_v1_list(cls, text: str) -> DevicePolicy:
        """A devices.list. Allow-all shows as ``a *:* rwm`` whatever is denied, so read that as allow-all."""
        policy = cls()
        for line in text.splitlines():
            match = re.fullmatch(r"([abc]) (\d+|\*):(\d+|\*) ([rwm]+)", line.strip())
            if match is None:
                continue
            kind, major, minor, access = match.groups()
            if kind == "a":
                return cls(default_allow=True)
            policy.apply(DeviceRule(True, kind, _parse_number(major), _parse_number(minor), access))
        return policy

    def apply(self, rule: DeviceRule) -> None:
        if rule.type == "a":
            self.default_allow, self.exceptions = rule.allow, {}
            return
        key: Key = (rule.type, rule.major, rule.minor)
        access = frozenset(rule.access)
        if rule.allow != self.default_allow:
            self.exceptions[key] = self.exceptions.get(key, frozenset()) | access
            if not self.exceptions[key]:
                del self.exceptions[key]
            return
        for partial in ((rule.type, WILDCARD, rule.minor), (rule.type, rule.major, WILDCARD),
                        (rule.type, WILDCARD, WILDCARD)):
            if partial != key and self.exceptions.get(partial, frozenset()) & access:
                wildcard = DeviceRule(True, *partial, _norm_access(self.exceptions[partial]))
                raise ValueError(f"{rule.cgroup_v1_line()} would punch a hole in the wildcard rule "
                                 f"{wildcard.cgroup_v1_line()}, which cgroups cannot do")
        remaining = self.exceptions.get(key, frozenset()) - access
        if remaining:
            self.exceptions[key] = remaining
        else:
            self.exceptions.pop(key, None)

    def rules(self) -> list[DeviceRule]:
        """The exceptions as rules, in a stable order (major, minor, type)."""
        ordered = sorted(self.exceptions.items(), key=lambda item: (item[0][1], item[0][2], item[0][0]))
        return [DeviceRule(not self.default_allow, kind, major, minor, _norm_access(access))
                for (kind, major, minor), access in ordered]

    def transition(self, target: DevicePolicy) -> list[DeviceRule]:
        """The fewest rules that turn this policy into ``target``: a reset only if the default changes
        (or this one allows all, whose deny exceptions cannot be read back)."""
        steps: list[DeviceRule] = []
        old = self.exceptions
        if self.default_allow or self.default_allow != target.default_allow:
            steps.append(DeviceRule(target.default_allow, "a"))
            old = {}
        for (kind, major, minor), access in sorted(old.items()):
            dropped = access - target.exceptions.get((kind, major, minor), frozenset())
            if dropped:
                steps.append(DeviceRule(target.default_allow, kind, major, minor, _norm_access(dropped)))
        for (kind, major, minor), access in sorted(target.exceptions.items()):
            gained = access - old.get((kind, major, minor), frozenset())
            if gained:
                steps.append(DeviceRule(not target.default_allow, kind, major, minor, _norm_access(gained)))
        return steps


def _parse_number(text: str) -> int:
    return WILDCARD if text == "*" else int(text)


# eBPF for BPF_PROG_TYPE_CGROUP_DEVICE. The context is struct bpf_cgroup_dev_ctx
# { u32 access_type (access << 16 | type); u32 major; u32 minor; }; returning 1 allows, 0 denies.
_BPF_TYPE = {"b": 1, "c": 2}  # BPF_DEVCG_DEV_BLOCK, BPF_DEVCG_DEV_CHAR
_BPF_ACCESS = {"m": 1, "r": 2, "w": 4}  # BPF_DEVCG_ACC_MKNOD, _READ, _WRITE


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _ldx_w(dst: int, offset: int) -> bytes:
    return _insn(0x61, dst, 1, offset)  # dst = *(u32 *)(r1 + offset)


def _return(value: int) -> bytes:
    return _insn(0xB7, 0, imm=value) + _insn(0x95)  # r0 = value; exit


def device_filter_program(policy: DevicePolicy) -> bytes:
    """The eBPF instructions that enforce ``policy``: each exception is a block that returns the opposite
    of the default when the device matches, and falls through to the next block otherwise."""
    program = [
        _ldx_w(2, 0), _insn(0x54, 2, imm=0xFFFF),  # r2 = type
        _ldx_w(3, 0), _insn(0x74, 3, imm=16),  # r3 = access requested
        _ldx_w(4, 4), _ldx_w(5, 8),  # r4 = major, r5 = minor
    ]
    for rule in policy.rules():
        checks: list[list[bytes]] = [[_insn(0x55, 2, imm=_BPF_TYPE[rule.type])]]  # if r2 != type: next block
        if rule.access != _ACCESS:
            mask = sum(_BPF_ACCESS[c] for c in rule.access)
            # r1 = r3 & mask; if r1 != r3 (something asked for is outside the mask): next block
            checks.append([_insn(0xBC, 1, 3), _insn(0x54, 1, imm=mask), _insn(0x5D, 1, 3)])
        if rule.major != WILDCARD:
            checks.append([_insn(0x55, 4, imm=rule.major)])
        if rule.minor != WILDCARD:
            checks.append([_insn(0x55, 5, imm=rule.minor)])
        flat = [insn for group in checks for insn in group]
        block_length = len(flat) + 2
        for position, insn in enumerate(flat):
            if insn[0] in (0x55, 0x5D):  # a jump: skip to the end of this block
                code, regs, _, imm = struct.unpack("<BBhi", insn)
                insn = struct.pack("<BBhi", code, regs, block_length - position - 1, imm)
            program.append(insn)
        program.append(_return(1 if rule.allow else 0))
    program.append(_return(1 if policy.default_allow else 0))
    return b"".join(program)
