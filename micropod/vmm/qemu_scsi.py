"""Disks hot-added to a running QEMU microvm: SCSI disks on one virtio-scsi controller.

microvm has no hotplug of virtio-mmio devices, and without ACPI it has only 8 virtio-mmio transports (measured:
the 9th ``-device`` fails with "No 'virtio-bus' bus found"), so placeholder virtio-blk drives would give a pod two
or three containers at most. A SCSI bus does hotplug: a pod's VM boots with one ``virtio-scsi-device`` (one
transport), and each later disk is a ``blockdev-add`` and a ``device_add scsi-hd`` at its own target; ``device_del``
takes it away once the guest has let it go. The guest finds a disk by its target (micropod/agent/hotdisk.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from micropod.errors import VmmError
from micropod.vmm.qemu_blocks import node_ref
from micropod.vmm.qemu_confined import open_disk
from micropod.vmm.qmp import QmpClient

CONTROLLER = "scsi0"
MAX_TARGETS = 255
FD_SET_BASE = 1000  # fd sets of hot-added disks, above those of the disks QEMU booted with
_UNPLUG_WAIT = 10.0


def controller_argv() -> list[str]:
    return ["-device", f"virtio-scsi-device,id={CONTROLLER}"]


def disk_address(target: int) -> str:
    """How the host names a hot-added disk to the agent."""
    return f"scsi:{target}"


class ScsiDisks:
    """A pod VM's hot-added disks, one per slot ``hd<N>`` at SCSI target N."""

    def __init__(self, qmp_socket: str, slots: int) -> None:
        if not 0 < slots <= MAX_TARGETS:
            raise VmmError(f"a SCSI bus has targets 0 to {MAX_TARGETS - 1}, not {slots}")
        self.qmp_socket = qmp_socket
        self.slots = slots
        self._nodes: dict[str, tuple[str, int]] = {}  # slot -> the block node behind its disk, and its fd set
        self._generation = 0

    def slot_ids(self, writable: bool) -> list[str]:
        return [f"hd{i}" for i in range(self.slots)]

    def attach(self, slot: str, path: Path, writable: bool) -> str:
        target = self._target(slot)
        self._generation += 1
        node = f"{slot}-{self._generation}"
        fd_set = FD_SET_BASE + self._generation
        # By descriptor, through an fd set: a confined QEMU can open no file by name (micropod/vmm/qemu_confined.py).
        fds = open_disk(path, writable)
        block: dict[str, Any] = {"driver": "raw", "node-name": node, "read-only": not writable, "discard": "unmap",
                                 "cache": {"no-flush": True},
                                 "file": {"driver": "file", "filename": f"/dev/fdset/{fd_set}",
                                          "read-only": not writable, "aio": "threads"}}
        device: dict[str, Any] = {"driver": "scsi-hd", "id": slot, "drive": node, "bus": f"{CONTROLLER}.0",
                                  "scsi-id": target, "lun": 0}
        qmp = QmpClient(self.qmp_socket)
        try:
            for fd in fds:
                qmp.execute("add-fd", pass_fd=fd, **{"fdset-id": fd_set})
            try:
                qmp.execute("blockdev-add", **block)
            except VmmError:
                qmp.execute("remove-fd", **{"fdset-id": fd_set})
                raise
            try:
                qmp.execute("device_add", **device)
            except VmmError:
                qmp.execute("blockdev-del", **node_ref(node))
                qmp.execute("remove-fd", **{"fdset-id": fd_set})
                raise
        finally:
            for fd in fds:
                os.close(fd)
            qmp.close()
        self._nodes[slot] = (node, fd_set)
        return disk_address(target)

    def detach(self, slot: str) -> None:
        """Unplug the slot's disk; the guest must acknowledge, within bounds, before its node can go."""
        if slot not in self._nodes:
            return
        node, fd_set = self._nodes[slot]
        qmp = QmpClient(self.qmp_socket)
        try:
            qmp.execute("device_del", id=slot)
            deadline, delay = time.monotonic() + _UNPLUG_WAIT, 0.002
            # The guest acknowledges the unplug in its own time; until then the node stays in use.
            while True:
                try:
                    if not _present(qmp, slot):
                        qmp.execute("blockdev-del", **node_ref(node))
                        qmp.execute("remove-fd", **{"fdset-id": fd_set})
                        break
                except VmmError as exc:
                    if "in use" not in str(exc):
                        raise
                if time.monotonic() > deadline:
                    raise VmmError(f"the guest did not release disk {slot} within {_UNPLUG_WAIT:.0f}s")
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        finally:
            qmp.close()
        del self._nodes[slot]

    def _target(self, slot: str) -> int:
        if not slot.startswith("hd") or not slot[2:].isdigit() or int(slot[2:]) >= self.slots:
            raise VmmError(f"no disk slot {slot!r}")
        return int(slot[2:])


def _present(qmp: QmpClient, slot: str) -> bool:
    children = qmp.execute("qom-list", path="/machine/peripheral")
    if not isinstance(children, list):
        raise VmmError(f"QMP qom-list answered {type(children).__name__}, not a list")
    return any(isinstance(child, dict) and child.get("name") == slot for child in children)
