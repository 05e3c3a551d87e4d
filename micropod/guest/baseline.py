"""The benchmark baseline: the same kernel booting a busybox root whose init powers off at once.

`micropod run` is measured against this bare `qemu-system-x86_64 -M microvm` boot, so the difference
is micropod's own cost (agent start, disks, channel), not the kernel's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from micropod.guest import artefacts
from micropod.guest.staging import exclusive_lock, make_dirs, pack_squashfs, scratch_dir
from micropod.guest.system_build import install_busybox
from micropod.paths import CacheRoot

log = logging.getLogger("micropod")

# `reboot -f` calls reboot(2) directly, the same exit path as the agent; with `reboot=t` and QEMU's
# -no-reboot the VM's reset ends the QEMU process. (Power-off would only halt: microvm without ACPI
# has no power-off device.)
BASELINE_INIT = "#!/bin/sh\nexec /bin/busybox reboot -f\n"

# Options both VMMs need. QEMU gets `reboot=t` (triple fault -> reset -> exit under -no-reboot);
# Firecracker exits on the i8042 reset of `reboot=k`.
BASE_CMDLINE = "console=ttyS0 panic=-1 random.trust_cpu=on"
QEMU_CMDLINE = f"{BASE_CMDLINE} reboot=t"
FIRECRACKER_CMDLINE = f"{BASE_CMDLINE} reboot=k"
ROOT_CMDLINE = "root=/dev/vda ro rootfstype=squashfs"

QEMU_MACHINE = "microvm,acpi=off,x-option-roms=off"


def qemu_baseline_argv(kernel: Path, root: Path, *, quiet: bool = True) -> list[str]:
    """Boot ``kernel`` with ``root`` as /dev/vda under QEMU TCG; QEMU exits when the guest reboots."""
    cmdline = f"{QEMU_CMDLINE} {ROOT_CMDLINE} init=/sbin/init" + (" quiet" if quiet else "")
    return [
        "qemu-system-x86_64",
        "-M", QEMU_MACHINE, "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "256",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", "stdio",
        "-kernel", os.fspath(kernel), "-append", cmdline,
        "-drive", f"id=root,file={root},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
    ]


def stage_baseline(root: Path) -> None:
    install_busybox(root)
    init = root / "sbin/init"
    if init.exists() or init.is_symlink():
        init.unlink()
    init.write_text(BASELINE_INIT)
    init.chmod(0o755)
    make_dirs(root, ("dev", "proc", "sys"))


def build_baseline(cache: CacheRoot, *, force: bool = False) -> Path:
    dest = artefacts.baseline_path(cache)
    if dest.is_file() and not force:
        return dest
    with exclusive_lock(cache.path / "guest" / ".baseline.lock"), \
            scratch_dir(cache.path / "guest", ".baseline-") as root:
        log.info("staging the baseline root in %s", root)
        stage_baseline(root)
        return pack_squashfs(root, dest)


def baseline_root(cache: CacheRoot | None = None) -> Path:
    """The baseline squashfs for the current busybox, built if missing."""
    return build_baseline(cache or CacheRoot.from_env())

