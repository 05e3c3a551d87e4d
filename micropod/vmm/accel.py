"""Which accelerator really works here.

A host whose /dev/kvm comes from PVM (kvm_pvm loaded, no kvm_intel/kvm_amd) only runs PVM guest
kernels; a standard guest kernel hangs there, so such a /dev/kvm must not be trusted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SYS_MODULE = Path("/sys/module")


@dataclass(frozen=True)
class KvmVerdict:
    usable: bool
    reason: str


def kvm_verdict(dev: Path = Path("/dev/kvm"), modules: Path = SYS_MODULE) -> KvmVerdict:
    if not dev.exists():
        return KvmVerdict(False, f"{dev} does not exist")
    if not os.access(dev, os.R_OK | os.W_OK):
        return KvmVerdict(False, f"{dev} is not readable and writable by this user")
    hardware = [m for m in ("kvm_intel", "kvm_amd") if (modules / m).exists()]
    if (modules / "kvm_pvm").exists() and not hardware:
        return KvmVerdict(False, f"{dev} is provided by kvm_pvm, which runs only PVM guest kernels")
    if not hardware and not (modules / "kvm").exists():
        return KvmVerdict(False, f"{dev} exists but no KVM module (kvm_intel/kvm_amd) is loaded")
    return KvmVerdict(True, f"{dev} usable via {', '.join(hardware) or 'kvm'}")


def choose_accel() -> str:
    """'kvm' or 'tcg'; MICROPOD_ACCEL overrides the detection."""
    forced = os.environ.get("MICROPOD_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    return "kvm" if kvm_verdict().usable else "tcg"
