"""The VMM interface and the plain data that describes one VM.

A backend turns a VmSpec into a running VM and hands back a connected socket to the guest agent.
Drives are a list: a pod's VM on Firecracker boots with placeholder drives that are swapped after boot.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from micropod.quotas import IoLimits

# The guest finds its disks by position: the kernel names virtio-blk devices vda, vdb, ... in the
# order the VMM attaches them, and both backends attach them in VmSpec.drives order.
GUEST_DISK_NAMES = tuple(f"/dev/vd{chr(ord('a') + i)}" for i in range(26))

AGENT_VSOCK_PORT = 1024
AGENT_SERIAL_NAME = "micropod.agent"
GUEST_CID = 3


@dataclass(frozen=True)
class Drive:
    drive_id: str
    path: Path
    read_only: bool
    is_root: bool = False
    limits: IoLimits = field(default_factory=IoLimits)  # --device-{read,write}-{bps,iops}


@dataclass(frozen=True)
class Share:
    """A host directory the guest mounts by ``tag`` (virtio-9p; QEMU only)."""

    tag: str
    path: Path
    read_only: bool
    # what the host mounts in it later reaches a confined QEMU (a CRI sandbox's shared directory, where the host
    # binds host paths after boot); any other share is a private copy in QEMU's jail
    follows_host: bool = False


@dataclass(frozen=True)
class NetInterface:
    iface_id: str
    tap: str
    mac: str
    rate: int = 0  # --network-rate: bytes per second each way; 0 is none


@dataclass(frozen=True)
class VmSpec:
    """Everything a backend needs to boot one VM."""

    vm_id: str
    kernel: Path
    cmdline: str
    vcpus: int
    memory_mib: int
    drives: tuple[Drive, ...]
    run_dir: Path
    console_log: Path
    nets: tuple[NetInterface, ...] = ()
    shares: tuple[Share, ...] = ()
    confined: bool = True  # the VMM's own sandbox (QEMU's -sandbox; Firecracker's jailer is its own issue)
    hot_disks: int = 0  # a pod's VM on QEMU: SCSI disks it can take after boot (micropod/vmm/qemu_scsi.py)
    vmm_uid: int | None = None  # the VMM runs as this uid (and gid), given every file as a descriptor
    mmds: dict[str, Any] | None = None  # Firecracker: the metadata tree its MMDS (V2) serves on the first NIC
    extra: dict[str, str] = field(default_factory=dict)

    def guest_disk(self, drive_id: str) -> str:
        """The /dev name the guest sees for a drive."""
        for index, drive in enumerate(self.drives):
            if drive.drive_id == drive_id:
                return GUEST_DISK_NAMES[index]
        raise KeyError(drive_id)


class Vmm(Protocol):
    """One running (or about to run) VM."""

    name: str

    @property
    def warm(self) -> bool:
        """Resumed from a boot snapshot: the agent waits for ``restore`` instead of greeting."""

    def start(self) -> None:
        """Launch the VMM process and boot the guest. Returns once the guest is booting."""

    def connect_agent(self, timeout: float) -> socket.socket:
        """A connected stream socket to the guest agent; bounded by ``timeout``."""

    @property
    def pid(self) -> int | None:
        """The VMM process id, once started."""

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the VMM process to exit; its exit code, or None on timeout."""

    def stop(self) -> None:
        """Ask the VMM to end the VM now (quit / SendCtrlAltDel)."""

    def kill(self) -> None:
        """End the VMM process at once (SIGKILL)."""

    def settle_logs(self) -> None:
        """Once the VMM has exited: wait, bounded, until its last output is in the console and VMM logs."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def patch_drive(self, drive_id: str, path: Path) -> None:
        """Point a running VM's drive at another file (a pod's containers get their disks this way)."""

    def apply_limits(self) -> None:
        """The spec's disk and network limits, once the VM has started (where the VMM cannot take them before)."""

    def change_limits(self, drives: Mapping[str, IoLimits], net_rate: int | None) -> None:
        """New limits for a running VM's drives, and for its NIC unless ``net_rate`` is None."""
