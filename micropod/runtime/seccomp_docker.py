"""docker's (moby's) seccomp profiles turned into runtime-spec ones: the vendored default profile
(seccomp_default.json), filtered by capabilities, architecture and kernel version as moby does."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from micropod.errors import SeccompError, SpecError
from micropod.runtime.seccomp import MACHINE, _array

_PROFILE = Path(__file__).with_name("seccomp_default.json")

# uname's (and Go's) machine names, as moby's profiles name them in includes/excludes "arches".
_MOBY_ARCH = {
    "x86_64": "amd64", "amd64": "amd64", "i386": "x86", "i686": "x86", "x86": "x86", "aarch64": "arm64",
    "arm64": "arm64", "armv7l": "arm", "armv6l": "arm", "arm": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
    "riscv64": "riscv64", "loongarch64": "loong64", "loong64": "loong64", "mips64": "mips64",
}
_MOBY_NATIVE = {
    "amd64": "SCMP_ARCH_X86_64", "x86": "SCMP_ARCH_X86", "arm64": "SCMP_ARCH_AARCH64", "arm": "SCMP_ARCH_ARM",
    "ppc64le": "SCMP_ARCH_PPC64LE", "s390x": "SCMP_ARCH_S390X", "riscv64": "SCMP_ARCH_RISCV64",
    "loong64": "SCMP_ARCH_LOONGARCH64", "mips64": "SCMP_ARCH_MIPS64",
}
_OCI_FIELDS = ("defaultAction", "defaultErrnoRet", "architectures", "flags", "listenerPath", "listenerMetadata")


def _kernel_at_least(minimum: Any, field: str) -> bool:
    wanted = re.match(r"(\d+)\.(\d+)", minimum) if isinstance(minimum, str) else None
    running = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if wanted is None or running is None:
        raise SpecError(field, f"cannot compare kernel versions {minimum!r} and {os.uname().release}")
    return (int(running[1]), int(running[2])) >= (int(wanted[1]), int(wanted[2]))


def _applies(entry: Mapping[str, Any], capabilities: Collection[str], arch: str, field: str) -> bool:
    """moby's includes/excludes: every included cap present, no excluded one; arches; minimum kernels."""
    excludes, includes = entry.get("excludes") or {}, entry.get("includes") or {}
    if not isinstance(excludes, Mapping) or not isinstance(includes, Mapping):
        raise SpecError(field, "includes and excludes must be objects")
    if arch in _array(excludes.get("arches"), f"{field}.excludes.arches"):
        return False
    if any(c in capabilities for c in _array(excludes.get("caps"), f"{field}.excludes.caps")):
        return False
    if excludes.get("minKernel") is not None and _kernel_at_least(excludes["minKernel"], f"{field}.excludes"):
        return False
    if _array(includes.get("arches"), f"{field}.includes.arches") and arch not in includes["arches"]:
        return False
    if not all(c in capabilities for c in _array(includes.get("caps"), f"{field}.includes.caps")):
        return False
    return includes.get("minKernel") is None or _kernel_at_least(includes["minKernel"], f"{field}.includes")


def from_docker_profile(profile: Mapping[str, Any], capabilities: Collection[str], arch: str = MACHINE,
                        field: str = "seccomp profile") -> dict[str, Any]:
    """A profile in moby's format (``archMap``, ``includes``/``excludes``, as ``docker run --security-opt
    seccomp=FILE`` takes) turned into a runtime-spec ``linux.seccomp`` for a container whose bounding set is
    ``capabilities`` on ``arch`` (uname's or Go's name)."""
    moby_arch = _MOBY_ARCH.get(arch)
    if moby_arch is None:
        raise SeccompError(f"{field}: unknown architecture {arch!r}")
    if profile.get("architectures") and profile.get("archMap"):
        raise SpecError(field, "use either 'architectures' or 'archMap', not both")
    result: dict[str, Any] = {key: profile[key] for key in _OCI_FIELDS if profile.get(key) is not None}
    native = _MOBY_NATIVE.get(moby_arch)
    for entry in _array(profile.get("archMap"), f"{field}.archMap"):
        if isinstance(entry, Mapping) and entry.get("architecture") == native:
            result["architectures"] = [native, *(entry.get("subArchitectures") or [])]
            break
    syscalls = []
    for i, entry in enumerate(_array(profile.get("syscalls"), f"{field}.syscalls")):
        where = f"{field}.syscalls[{i}]"
        if not isinstance(entry, Mapping):
            raise SpecError(where, "must be an object")
        if not _applies(entry, capabilities, moby_arch, where):
            continue
        rule = {key: entry[key] for key in ("names", "action", "errnoRet", "args") if entry.get(key) is not None}
        if entry.get("name"):
            if rule.get("names"):
                raise SpecError(where, "use either 'name' or 'names', not both")
            rule["names"] = [entry["name"]]
        syscalls.append(rule)
    result["syscalls"] = syscalls
    return result


def docker_default(capabilities: Collection[str], arch: str = MACHINE) -> dict[str, Any]:
    """Docker's default seccomp profile (vendored from moby) as a ``linux.seccomp`` for a container with
    ``capabilities`` in its bounding set: without CAP_SYS_ADMIN, unshare, mount, setns and clone with
    namespace flags (CLONE_NEWUSER among them) are refused with EPERM, and clone3 with ENOSYS."""
    with open(_PROFILE, "rb") as f:
        profile = json.load(f)
    return from_docker_profile(profile, capabilities, arch)
