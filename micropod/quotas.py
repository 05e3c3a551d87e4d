"""What a container may take of the host beyond its vCPUs and memory, with docker's flags where docker has them:
CPU shares and a cpuset and a memory reservation for the VMM's host cgroup, I/O rates for the container's disks,
and a rate for its network. Parsed here, as plain data; the VMMs and the host cgroup apply them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import Any

from micropod.errors import UsageError

MAX_RATE = 1 << 32  # bytes or operations per second (4 GiB/s): tc's and nft's bursts are 32-bit
_CPUSET = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


@dataclass(frozen=True)
class IoLimits:
    """A disk's throttles in bytes and operations per second, each way; 0 is none."""

    read_bps: int = 0
    write_bps: int = 0
    read_iops: int = 0
    write_iops: int = 0

    def __bool__(self) -> bool:
        return any((self.read_bps, self.write_bps, self.read_iops, self.write_iops))

    def over(self, base: IoLimits) -> IoLimits:
        """These limits, and ``base``'s where these set none."""
        return IoLimits(self.read_bps or base.read_bps, self.write_bps or base.write_bps,
                        self.read_iops or base.read_iops, self.write_iops or base.write_iops)


@dataclass(frozen=True)
class DiskRate:
    """One disk's limits: ``target`` "" is every disk of the container, "/" its writable layer, any other path
    the named volume mounted there."""

    target: str
    limits: IoLimits


@dataclass(frozen=True)
class Quotas:
    cpu_shares: int = 0  # docker's --cpu-shares (1024 is the default weight); 0: the default
    cpuset_cpus: str = ""  # --cpuset-cpus: the host CPUs the VMM may run on; "": any
    memory_reservation_mib: int = 0  # --memory-reservation: the VMM's soft limit, beside the guest's RAM
    disk_rates: tuple[DiskRate, ...] = ()
    network_rate: int = 0  # --network-rate: bytes per second each way on the VM's NIC; 0: none

    def disk_limits(self, target: str) -> IoLimits:
        """The limits of the disk at ``target`` ("/" for the writable layer): its own, then every disk's."""
        general = next((r.limits for r in self.disk_rates if r.target == ""), IoLimits())
        specific = next((r.limits for r in self.disk_rates if r.target == target), IoLimits())
        return specific.over(general)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Quotas:
        rates = tuple(DiskRate(str(r["target"]), IoLimits(**r["limits"])) for r in raw.pop("disk_rates", ()))
        return cls(disk_rates=rates, **raw)


def parse_rate(text: str, flag: str, per: str = "bytes") -> int:
    """docker's rates: ``5m``, ``1mb``, ``512k`` bytes per second (binary multiples), or a count of operations."""
    from micropod.units import parse_size

    try:
        value = int(text) if per == "ops" else parse_size(text)
    except (UsageError, ValueError):
        example = "1000" if per == "ops" else "5m or 512k"
        raise UsageError(f"invalid {flag} {text!r}: use a rate such as {example}") from None
    if not 0 < value <= MAX_RATE:
        raise UsageError(f"invalid {flag} {text!r}: the rate must be above 0 and at most {MAX_RATE}")
    return value


def parse_disk_rates(flags: dict[str, tuple[str, ...]]) -> tuple[DiskRate, ...]:
    """--device-read-bps and its three siblings, each ``[PATH:]RATE``: PATH "/" is the writable layer, another
    the volume mounted there, none every disk of the container."""
    fields = {"--device-read-bps": "read_bps", "--device-write-bps": "write_bps",
              "--device-read-iops": "read_iops", "--device-write-iops": "write_iops"}
    by_target: dict[str, IoLimits] = {}
    for flag, values in flags.items():
        for value in values:
            target, _, rate = value.rpartition(":")
            if target and not target.startswith("/"):
                raise UsageError(f"invalid {flag} {value!r}: use [PATH:]RATE, PATH being / (the writable layer) "
                                 "or a volume's path in the container")
            limit = parse_rate(rate, flag, per="ops" if flag.endswith("iops") else "bytes")
            current = by_target.get(target, IoLimits())
            by_target[target] = replace(current, **{fields[flag]: limit})
    return tuple(DiskRate(target, limits) for target, limits in by_target.items())


def parse_cpu_shares(shares: int) -> int:
    if shares and not 2 <= shares <= 262144:
        raise UsageError(f"invalid --cpu-shares {shares}: from 2 to 262144 (1024 is the default weight)")
    return shares


def parse_cpuset(text: str, flag: str = "--cpuset-cpus", available: set[int] | None = None) -> str:
    """--cpuset-cpus: ``0-1,3``, each CPU one this host has (or one of ``available``: a pod's VM's vCPUs or
    memory nodes)."""
    if not text:
        return ""
    if not _CPUSET.match(text):
        raise UsageError(f"invalid {flag} {text!r}: use numbers and ranges such as 0-1,3")
    wanted: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        if last and int(last) < int(first):
            raise UsageError(f"invalid {flag} {text!r}: the range {part} runs backwards")
        wanted.update(range(int(first), int(last or first) + 1))
    missing = sorted(wanted - (os.sched_getaffinity(0) if available is None else available))
    if missing and available is None:
        raise UsageError(f"invalid {flag} {text!r}: this host has no CPU {missing[0]} that micropod may use")
    if missing and available:
        raise UsageError(f"invalid {flag} {text!r}: the pod's VM has no {missing[0]} (it has 0-{max(available)})")
    return text
