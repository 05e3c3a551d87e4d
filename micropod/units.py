"""Parsing of user-facing quantities: --memory, --cpus, sizes, durations."""

from __future__ import annotations

import os
import re

from micropod.errors import UsageError

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_FACTORS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

MIN_MEMORY_MIB = 64
MAX_VCPUS = 32


def parse_memory_mib(text: str) -> int:
    """docker's --memory syntax (``256m``, ``1g``, ``512MiB``, bare bytes) as whole MiB."""
    match = _MEMORY.match(text)
    if not match:
        raise UsageError(f"invalid --memory {text!r}: use a size such as 256M or 1G")
    number, unit = match.groups()
    size = float(number) * _FACTORS[unit.lower()]
    mib = int(size // (1 << 20))
    if mib < MIN_MEMORY_MIB:
        raise UsageError(f"invalid --memory {text!r}: a microVM needs at least {MIN_MEMORY_MIB}M")
    return mib


def parse_size(text: str) -> int:
    """A size in bytes in docker's syntax (``100``, ``10k``, ``512m``, ``64g``, ``1t``; binary multiples,
    an optional ``b`` or ``ib``)."""
    match = _MEMORY.match(text)
    if not match:
        raise UsageError(f"invalid size {text!r}: use a size such as 512M or 64G")
    number, unit = match.groups()
    return int(float(number) * _FACTORS[unit.lower()])


def binary_size(size: int) -> str:
    """``64 GiB``, ``1.5 MiB``: sizes of limits, as the user sets them."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:.3g} {unit}"
    return f"{size} B"


def parse_cpus(text: str) -> int:
    """--cpus as a whole number of vCPUs; fractions round up, as a VM cannot have part of one."""
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"invalid --cpus {text!r}: use a number such as 1 or 2") from None
    if not 0 < value <= MAX_VCPUS:
        raise UsageError(f"invalid --cpus {text!r}: must be more than 0 and at most {MAX_VCPUS}")
    whole = int(value)
    return whole if whole == value else whole + 1


def host_cpus() -> int:
    return os.cpu_count() or 1


def human_size(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.3g}{unit}"
        size /= 1000
    return f"{size}B"


def human_duration(seconds: float) -> str:
    """docker's coarse 'About a minute', '3 hours' style."""
    seconds = max(0, int(seconds))
    if seconds < 1:
        return "Less than a second"
    if seconds < 60:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = seconds // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = minutes // 60
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    return f"{hours // 24} days"
