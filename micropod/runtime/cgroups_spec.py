"""Validation of ``linux.resources`` (runtime-spec 1.2): every field's type and range, with an error that
names the field. config.json is untrusted, so nothing reaches a cgroup file before it passes here.

Unknown fields are ignored, as runc's decoder does. What depends on the cgroup version (``unified`` on v1,
realtime on v2) is checked by the managers' own ``validate``.

Standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from micropod.errors import SpecError
from micropod.runtime.cgroups_devices import DevicePolicy, parse_device_rules

INT64 = (-(1 << 63), (1 << 63) - 1)
UINT64 = (0, (1 << 64) - 1)
UINT32 = (0, (1 << 32) - 1)
LIMIT = (-1, INT64[1])  # a byte limit: -1 is unlimited, 0 unset
_CPU_LIST = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")
_PAGE_SIZE = re.compile(r"[1-9]\d*[KMGTP]?B")
_UNIFIED_KEY = re.compile(r"[a-z][a-z0-9_]*\.[a-z0-9_.]+")
# The only cgroup.* files a config may set: the others move processes or change the tree's shape.
_UNIFIED_CGROUP_FILES = frozenset({"cgroup.max.depth", "cgroup.max.descendants"})
_WEIGHT = (10, 1000)  # blkio.weight's range; the v2 conversion needs at least 10


def _object(value: object, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(field, "must be an object")
    return value


def _list(value: object, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise SpecError(field, "must be an array")
    return value


def number(obj: Mapping[str, Any], key: str, field: str, bounds: tuple[int, int],
           required: bool = False) -> int | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise SpecError(f"{field}.{key}", "is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{field}.{key}", f"must be an integer, not {type(value).__name__}")
    if not bounds[0] <= value <= bounds[1]:
        raise SpecError(f"{field}.{key}", f"{value} is out of range [{bounds[0]}, {bounds[1]}]")
    return value


def _weight(obj: Mapping[str, Any], key: str, field: str) -> None:
    value = number(obj, key, field, (0, 65535))
    if value and not _WEIGHT[0] <= value <= _WEIGHT[1]:
        raise SpecError(f"{field}.{key}", f"{value} is out of range [{_WEIGHT[0]}, {_WEIGHT[1]}]")


def _flag(obj: Mapping[str, Any], key: str, field: str) -> None:
    if obj.get(key) is not None and not isinstance(obj[key], bool):
        raise SpecError(f"{field}.{key}", "must be a boolean")


def _text(obj: Mapping[str, Any], key: str, field: str, pattern: re.Pattern[str] | None = None,
          required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None or (value == "" and not required):
        if required:
            raise SpecError(f"{field}.{key}", "is required")
        return None
    if not isinstance(value, str):
        raise SpecError(f"{field}.{key}", "must be a string")
    if pattern is not None and not pattern.fullmatch(value):
        raise SpecError(f"{field}.{key}", f"{value!r} is not valid")
    return value


def _devices(entries: object, field: str, numbers: tuple[str, ...]) -> None:
    for index, entry in enumerate(_list(entries, field)):
        where = f"{field}[{index}]"
        entry = _object(entry, where)
        number(entry, "major", where, (0, UINT32[1]), required=True)
        number(entry, "minor", where, (0, UINT32[1]), required=True)
        for key in numbers:
            if key == "rate":
                number(entry, key, where, UINT64, required=True)
            else:
                _weight(entry, key, where)


def _memory(memory: Mapping[str, Any], field: str) -> None:
    limit = number(memory, "limit", field, LIMIT)
    number(memory, "reservation", field, LIMIT)
    swap = number(memory, "swap", field, LIMIT)
    number(memory, "kernel", field, INT64)  # ignored, as by runc 1.1
    number(memory, "kernelTCP", field, INT64)
    number(memory, "swappiness", field, (0, 100))
    for key in ("disableOOMKiller", "useHierarchy", "checkBeforeUpdate"):
        _flag(memory, key, field)
    if limit and swap and limit > 0 and 0 < swap < limit:
        raise SpecError(f"{field}.swap", f"{swap} is below limit {limit}; it counts memory plus swap")


def _cpu(cpu: Mapping[str, Any], field: str) -> None:
    shares = number(cpu, "shares", field, UINT64)
    if shares and not 2 <= shares <= 262144:
        raise SpecError(f"{field}.shares", f"{shares} is out of range [2, 262144]")
    number(cpu, "quota", field, INT64)
    number(cpu, "burst", field, UINT64)
    number(cpu, "period", field, UINT64)
    number(cpu, "realtimeRuntime", field, INT64)
    number(cpu, "realtimePeriod", field, UINT64)
    number(cpu, "idle", field, (0, 1))
    _text(cpu, "cpus", field, _CPU_LIST)
    _text(cpu, "mems", field, _CPU_LIST)


def _block_io(block_io: Mapping[str, Any], field: str) -> None:
    _weight(block_io, "weight", field)
    _weight(block_io, "leafWeight", field)
    if block_io.get("weightDevice") is not None:
        _devices(block_io["weightDevice"], f"{field}.weightDevice", ("weight", "leafWeight"))
    for key in ("throttleReadBpsDevice", "throttleWriteBpsDevice", "throttleReadIOPSDevice",
                "throttleWriteIOPSDevice"):
        if block_io.get(key) is not None:
            _devices(block_io[key], f"{field}.{key}", ("rate",))


def _network(network: Mapping[str, Any], field: str) -> None:
    number(network, "classID", field, UINT32)
    for index, priority in enumerate(_list(network.get("priorities") or [], f"{field}.priorities")):
        where = f"{field}.priorities[{index}]"
        priority = _object(priority, where)
        _text(priority, "name", where, re.compile(r"[^\s/]{1,15}"), required=True)
        number(priority, "priority", where, UINT32, required=True)


def _rdma(rdma: Mapping[str, Any], field: str) -> None:
    for device, limits in rdma.items():
        if not isinstance(device, str) or not re.fullmatch(r"[^\s=]{1,64}", device):
            raise SpecError(field, f"{device!r} is not a device name")
        limits = _object(limits, f"{field}.{device}")
        number(limits, "hcaHandles", f"{field}.{device}", UINT32)
        number(limits, "hcaObjects", f"{field}.{device}", UINT32)


def _unified(unified: Mapping[str, Any], field: str) -> None:
    for key, value in unified.items():
        if not isinstance(key, str) or not _UNIFIED_KEY.fullmatch(key):
            raise SpecError(field, f"{key!r} must be a file name of the form CONTROLLER.PARAMETER")
        if key.startswith("cgroup.") and key not in _UNIFIED_CGROUP_FILES:
            raise SpecError(f"{field}.{key}", "may not be set from a config")
        if not isinstance(value, str) or "\0" in value:
            raise SpecError(f"{field}.{key}", "must be a string without NUL")


def validate_resources(resources: object, field: str = "linux.resources") -> None:
    """Raise SpecError naming the first bad field; valid resources pass silently."""
    r = _object(resources, field)
    if r.get("devices") is not None:
        DevicePolicy.from_rules(parse_device_rules(r["devices"], f"{field}.devices"), f"{field}.devices")
    sections = (("memory", _memory), ("cpu", _cpu), ("blockIO", _block_io), ("network", _network),
                ("rdma", _rdma), ("unified", _unified))
    for key, check in sections:
        if r.get(key) is not None:
            check(_object(r[key], f"{field}.{key}"), f"{field}.{key}")
    if r.get("pids") is not None:
        number(_object(r["pids"], f"{field}.pids"), "limit", f"{field}.pids", INT64, required=True)
    for index, hugepage in enumerate(_list(r.get("hugepageLimits") or [], f"{field}.hugepageLimits")):
        where = f"{field}.hugepageLimits[{index}]"
        hugepage = _object(hugepage, where)
        _text(hugepage, "pageSize", where, _PAGE_SIZE, required=True)
        number(hugepage, "limit", where, UINT64, required=True)
