"""Host checks: which VMMs, accelerators and guest artefacts are usable here, and why."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from micropod.errors import MicropodError
from micropod.paths import StateRoot


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def _tool(name: str, package: str, required: bool = True) -> Check:
    path = shutil.which(name)
    return Check(name, path is not None, path or f"not found (apt-get install {package})", required)


def _network_checks() -> list[Check]:
    """What bridge networking (the default) needs; `--network none` needs none of it."""
    from micropod.net.config import NetworkConfig

    checks = [_tool("nft", "nftables")]
    tun = os.path.exists("/dev/net/tun")
    checks.append(Check("tun", tun, "/dev/net/tun" if tun else "/dev/net/tun missing (modprobe tun)"))
    try:
        network = NetworkConfig.from_env()
    except MicropodError as exc:
        checks.append(Check("network", False, str(exc)))
        return checks
    checks.append(Check("network", True, f"bridge {network.bridge}, subnet {network.subnet} "
                                         "(MICROPOD_BRIDGE, MICROPOD_SUBNET; MICROPOD_NETWORK=none for no NIC)"))
    if shutil.which("nft"):
        from micropod.net.nft import forward_blockers

        blockers = forward_blockers()
        checks.append(Check("forwarding", not blockers, "no forward chain drops by default" if not blockers else
                            f"{', '.join(blockers)}: policy drop, so VM traffic through the bridge is dropped "
                            f"unless {'it accepts' if len(blockers) == 1 else 'they accept'} {network.subnet}",
                            required=False))
    return checks


def run_checks(root: StateRoot) -> list[Check]:
    from micropod.guest.artefacts import kernel_key, locate, system_key
    from micropod.paths import CacheRoot
    from micropod.vmm.accel import choose_accel, kvm_verdict
    from micropod.vmm.binaries import find_firecracker, find_qemu

    checks = []
    qemu = find_qemu()
    qemu_ok = qemu is not None and os.access(qemu, os.X_OK)
    checks.append(Check("qemu", qemu_ok, str(qemu) if qemu_ok else
                        "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"))
    verdict = kvm_verdict()
    checks.append(Check("kvm", verdict.usable, verdict.reason, required=False))
    checks.append(Check("qemu accelerator", True, f"{choose_accel()} (MICROPOD_ACCEL overrides)"))
    firecracker = find_firecracker()
    fc_ok = firecracker is not None and verdict.usable
    fc_detail = (f"{firecracker}" if firecracker else "firecracker binary not found") + (
        "" if verdict.usable else "; needs a usable KVM")
    checks.append(Check("firecracker", fc_ok, fc_detail, required=False))
    checks.append(_tool("tar2sqfs", "squashfs-tools-ng"))
    checks.append(_tool("mkfs.ext4", "e2fsprogs"))
    checks.extend(_network_checks())
    cache = CacheRoot.from_env()
    try:
        guest = locate(cache)
        checks.append(Check("guest kernel", True, str(guest.kernel)))
        checks.append(Check("guest system image", True, str(guest.system)))
    except MicropodError as exc:
        checks.append(Check("guest artefacts", False,
                            f"{exc} (kernel key {kernel_key()[:12]}, system key {system_key()[:12]})"))
    try:
        root.ensure()
        writable = os.access(root.path, os.W_OK)
        checks.append(Check("state root", writable, f"{root.path}{'' if writable else ' is not writable'}"))
    except OSError as exc:
        checks.append(Check("state root", False, f"{root.path}: {exc.strerror}"))
    return checks
