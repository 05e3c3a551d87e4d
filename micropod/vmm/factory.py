"""From a RunConfig to a VmSpec and a backend: the one place that picks and configures a VMM."""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from micropod.errors import UsageError, VmmUnavailableError
from micropod.paths import CacheRoot, VmDir
from micropod.podconfig import SHARED_DIR, PodConfig
from micropod.quotas import IoLimits
from micropod.runconfig import POD_SHARE_TAG, RunConfig, bind_tag
from micropod.vmm import rootsnap, snapshot
from micropod.vmm.accel import kvm_verdict
from micropod.vmm.base import Drive, NetInterface, Share, Vmm, VmSpec
from micropod.vmm.rootsnap import FreshRoot

if TYPE_CHECKING:
    from micropod.monitor.pool import DrivePool
    from micropod.vmm.firecracker import JailerConfig

log = logging.getLogger("micropod.monitor")

BACKENDS = ("auto", "qemu", "firecracker")

# keeps the slow emulated serial console short; panic=-1 ends the VM if the agent (PID 1) dies.
BASE_CMDLINE = (
    "console=ttyS0 quiet panic=-1 random.trust_cpu=on "
    "root=/dev/vda ro rootfstype=squashfs init=/sbin/micropod-init"
)
# Firecracker ends the VM on the i8042 reset; QEMU with -no-reboot on a triple fault.
REBOOT_METHOD = {"qemu": "reboot=t", "firecracker": "reboot=k pci=off"}

# Tests only: the container's program replaces the agent as PID 1 (micropod/agent/handover.py), so that a test
# can run a guest that speaks the host protocol itself. Set by the host, on the command line it controls anyway.
HOSTILE_GUEST_ENV = "MICROPOD_TEST_HOSTILE_GUEST"
HANDOVER_WORD = "MICROPOD_AGENT_HANDOVER=1"
# Benchmarks only: the agent's plain chroot instead of micropod-runtime, the baseline `make bench` compares with.
CHROOT_AGENT_ENV = "MICROPOD_BENCH_CHROOT_AGENT"
CHROOT_WORD = "MICROPOD_AGENT_RUNTIME=0"

SYSTEM_DRIVE, ROOTFS_DRIVE, UPPER_DRIVE = "system", "rootfs", "upper"


def volume_drive(index: int) -> str:
    """The drive id of the container's ``index``-th named volume, after the three disks every VM has."""
    return f"vol{index}"


def pool_drive(writable: bool, index: int) -> str:
    """The id of a pod's ``index``-th read-only or writable placeholder drive (micropod/monitor/pool.py)."""
    return f"{'rw' if writable else 'ro'}{index}"


# The agent of a pod's VM keeps the VM up when its containers exit: only `pod stop` and `pod rm` end it.
POD_WORD = "MICROPOD_AGENT_POD=1"
PLACEHOLDER_SIZE = 4096


def placeholder(vm_dir: VmDir, drive_id: str) -> Path:
    """The file a pool drive boots with: a few zeroed blocks, one per drive (QEMU locks a writable file)."""
    path = vm_dir.path / f"placeholder-{drive_id}.img"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, PLACEHOLDER_SIZE)
        finally:
            os.close(fd)
    return path


def build_pod_spec(cfg: PodConfig, vm_dir: VmDir, with_network: bool = True) -> VmSpec:
    """A pod's VM: the system disk and no container. On QEMU, a SCSI controller for the disks of containers
    added later; on Firecracker, ``pool`` read-only and ``pool`` writable placeholder drives for them."""
    pool = () if cfg.backend == "qemu" else tuple(
        Drive(pool_drive(writable, i), placeholder(vm_dir, pool_drive(writable, i)), read_only=not writable)
        for writable in (False, True) for i in range(cfg.pool))
    return VmSpec(
        vm_id=cfg.pod_id,
        kernel=Path(cfg.kernel),
        cmdline=f"{kernel_cmdline(cfg.backend)} {POD_WORD}",
        vcpus=cfg.vcpus,
        memory_mib=cfg.memory_mib,
        drives=(Drive(SYSTEM_DRIVE, Path(cfg.system), read_only=True, is_root=True), *pool),
        run_dir=vm_dir.path,
        console_log=vm_dir.console_log,
        nets=(NetInterface("net0", cfg.network.tap, cfg.network.mac),)
        if with_network and cfg.network.has_nic else (),
        confined=cfg.vmm_confinement,
        hot_disks=2 * cfg.pool if cfg.backend == "qemu" else 0,
        shares=(Share(POD_SHARE_TAG, vm_dir.path / SHARED_DIR, read_only=False, follows_host=True),)
        if cfg.host_share else (),
    )


def pod_disks(vmm: Vmm, spec: VmSpec, cfg: PodConfig, vm_dir: VmDir) -> DrivePool:
    """The running pod VM's drive pool, the VMM's way."""
    from micropod.monitor.pool import DrivePool, PlaceholderDisks

    hot_disks = getattr(vmm, "hot_disks", None)
    if spec.hot_disks and callable(hot_disks):
        return DrivePool(hot_disks(), 2 * cfg.pool)
    return DrivePool(PlaceholderDisks(vmm, spec, cfg.pool, lambda slot: placeholder(vm_dir, slot)), cfg.pool)


def resolve_backend(requested: str) -> str:
    if requested not in BACKENDS:
        raise UsageError(f"invalid --vmm {requested!r}: choose one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    from micropod.vmm.binaries import find_firecracker

    if find_firecracker() is not None and kvm_verdict().usable:
        return "firecracker"
    return "qemu"


def check_available(backend: str) -> None:
    """Fail before anything is recorded when the chosen VMM cannot run here."""
    if backend == "qemu":
        from micropod.vmm.binaries import find_qemu

        qemu = find_qemu()
        if qemu is None or not qemu.is_file():
            raise VmmUnavailableError("QEMU (qemu-system-x86_64) not found", hint="see 'micropod doctor'")
    elif backend == "firecracker":
        from micropod.vmm.binaries import find_firecracker

        if find_firecracker() is None:
            raise VmmUnavailableError("firecracker not found", hint="see 'micropod doctor'")
        verdict = kvm_verdict()
        if not verdict.usable:
            raise VmmUnavailableError(f"firecracker needs KVM: {verdict.reason}", hint="see 'micropod doctor'")


def kernel_cmdline(backend: str) -> str:
    words = [BASE_CMDLINE, REBOOT_METHOD[backend]]
    if os.environ.get(HOSTILE_GUEST_ENV) == "1":
        words.append(HANDOVER_WORD)
    if os.environ.get(CHROOT_AGENT_ENV) == "1":
        words.append(CHROOT_WORD)
    return " ".join(words)


def disk_limits(cfg: RunConfig) -> dict[str, IoLimits]:
    """Every writable disk's limits, by drive id: the writable layer's, then each volume's."""
    limits = {UPPER_DRIVE: cfg.quotas.disk_limits("/")}
    for index, volume in enumerate(cfg.container.volumes):
        limits[volume_drive(index)] = cfg.quotas.disk_limits(volume.target)
    return limits


def build_spec(cfg: RunConfig, vm_dir: VmDir, with_network: bool = True) -> VmSpec:
    limits = disk_limits(cfg)
    drives = (
        Drive(SYSTEM_DRIVE, Path(cfg.system), read_only=True, is_root=True),
        Drive(ROOTFS_DRIVE, Path(cfg.rootfs), read_only=True),
        Drive(UPPER_DRIVE, vm_dir.upper, read_only=False, limits=limits[UPPER_DRIVE]),
        *(Drive(volume_drive(i), Path(v.path), read_only=v.read_only, limits=limits[volume_drive(i)])
          for i, v in enumerate(cfg.container.volumes)),
    )
    return VmSpec(
        vm_id=cfg.vm_id,
        kernel=Path(cfg.kernel),
        cmdline=kernel_cmdline(cfg.backend),
        vcpus=cfg.vcpus,
        memory_mib=cfg.memory_mib,
        drives=drives,
        run_dir=vm_dir.path,
        console_log=vm_dir.console_log,
        nets=(NetInterface("net0", cfg.network.tap, cfg.network.mac, cfg.quotas.network_rate),)
        if with_network and cfg.network.has_nic else (),
        shares=tuple(Share(bind_tag(i), Path(b.source), b.read_only) for i, b in enumerate(cfg.container.binds)),
        confined=cfg.container.security.vmm_confinement,
    )


def jailer_for(spec: VmSpec) -> JailerConfig | None:
    """A confined Firecracker runs under its jailer, as the VM's own uid, in a chroot under
    MICROPOD_JAILER_BASE (default /srv/jailer), which must be on the filesystem of the VM's disks (they are
    hard-linked in)."""
    if not spec.confined:
        return None
    from micropod.vmm.binaries import find_jailer
    from micropod.vmm.firecracker import JailerConfig

    jailer = find_jailer()
    if jailer is None:
        raise VmmUnavailableError("firecracker's jailer not found: a confined Firecracker runs under it",
                                  hint="install it beside firecracker (or set MICROPOD_JAILER), or use "
                                       "--security-opt vmm-confinement=off")
    if spec.vmm_uid is None:
        raise VmmUnavailableError("a confined Firecracker needs a uid of its own (micropod/vmm/vmm_ids.py)")
    base = Path(os.environ.get("MICROPOD_JAILER_BASE", "/srv/jailer"))
    return JailerConfig(binary=jailer, uid=spec.vmm_uid, gid=spec.vmm_uid, chroot_base=base)


def create_vmm(backend: str, spec: VmSpec, warm: bool = True, fresh: FreshRoot | None = None) -> Vmm:
    """A backend for ``spec``; with ``warm``, QEMU VMs resume from a boot snapshot when they can, and a container's
    first boot (``fresh``: its writable layer not made yet) from a snapshot taken with its image's root mounted."""
    if backend == "qemu":
        from micropod.vmm.qemu import QemuVmm

        vmm = QemuVmm(spec)
        if not (warm and snapshot.enabled()):
            if fresh is not None:
                fresh.ensure_layer()
            return vmm
        factory = partial(QemuVmm, binary=vmm.binary, accel=vmm.accel)
        shape = QemuVmm(snapshot.machine_shape(spec), vmm.binary, vmm.accel).argv
        if fresh is not None and not fresh.upper.exists() and rootsnap.enabled():
            template = rootsnap.RootTemplate(
                fresh, {"lower": spec.guest_disk(ROOTFS_DRIVE), "upper": spec.guest_disk(UPPER_DRIVE)},
                ROOTFS_DRIVE, next(d.path for d in spec.drives if d.drive_id == ROOTFS_DRIVE), UPPER_DRIVE)
            digests = rootsnap.digests_dir(CacheRoot.from_env())
            ready = rootsnap.restore_root(factory, spec, rootsnap.root_key(spec, shape, vmm.binary, template, digests),
                                          template)
            if ready is not None:
                log.debug("phase: resuming with the image's root ready")
                return QemuVmm(spec, vmm.binary, vmm.accel, snapshot=ready[0], snapshot_fd=ready[1])
        if fresh is not None:
            fresh.ensure_layer()
        key = snapshot.snapshot_key(spec, shape, vmm.binary)
        saved = snapshot.ensure_snapshot(factory, spec, key)
        return QemuVmm(spec, vmm.binary, vmm.accel, snapshot=saved) if saved else vmm
    if fresh is not None:
        fresh.ensure_layer()
    if backend == "firecracker":
        from micropod.vmm.binaries import find_firecracker
        from micropod.vmm.firecracker import FirecrackerVmm

        binary = find_firecracker()
        if binary is None:
            raise VmmUnavailableError("firecracker not found", hint="see 'micropod doctor'")
        return FirecrackerVmm(spec, binary, jailer_for(spec))
    raise UsageError(f"unknown VMM backend {backend!r}")
