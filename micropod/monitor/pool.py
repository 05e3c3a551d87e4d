"""A pod VM's drive pool: the disks of containers added after boot, within the bound that `pod create` sets.

Neither VMM hotplugs virtio-mmio devices. On QEMU a pod's VM has one virtio-scsi controller and each disk is a
SCSI disk hot-added at a free target (micropod/vmm/qemu_scsi.py says why). On Firecracker the VM boots with
``pool`` read-only and ``pool`` writable placeholder drives, and a disk is a drive's backing file swapped with
``PATCH /drives/{id}``, as Kata does. Either way a file that several containers use (an image's base, a shared
volume) is attached once, and its slot is freed when the last container using it is removed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from micropod.errors import ConflictError, MicropodError, UsageError
from micropod.vmm.base import Vmm, VmSpec
from micropod.vmm.factory import pool_drive


class PoolExhausted(UsageError):
    pass


QUARANTINED = "(quarantined)"  # the user of a slot that must not be reused before the VM ends


class Disks(Protocol):
    """A running VM's slots for disks."""

    def slot_ids(self, writable: bool) -> list[str]:
        """The slots a disk of this kind may take."""

    def attach(self, slot: str, path: Path, writable: bool) -> str:
        """``path`` into ``slot``; the address by which the agent finds it."""

    def detach(self, slot: str) -> None: ...


class PlaceholderDisks:
    """Firecracker's way: drives the VM booted with, whose files are swapped."""

    def __init__(self, vmm: Vmm, spec: VmSpec, size: int, placeholder: Callable[[str], Path]) -> None:
        self.vmm, self.spec, self.size, self.placeholder = vmm, spec, size, placeholder

    def slot_ids(self, writable: bool) -> list[str]:
        return [pool_drive(writable, i) for i in range(self.size)]

    def attach(self, slot: str, path: Path, writable: bool) -> str:
        self.vmm.patch_drive(slot, path)
        return self.spec.guest_disk(slot)

    def detach(self, slot: str) -> None:
        self.vmm.patch_drive(slot, self.placeholder(slot))


@dataclass
class Lent:
    """A slot lent to ``path``, and the containers that use it."""

    slot: str
    path: Path
    writable: bool
    address: str
    users: set[str] = field(default_factory=set)


class DrivePool:
    def __init__(self, disks: Disks, size: int) -> None:
        self.disks = disks
        self.size = size
        self.lent: dict[str, Lent] = {}  # by slot

    def attach(self, user: str, path: Path, writable: bool) -> str:
        """The address of ``path`` for ``user``: a slot already lent to that file, or a free one.
        PoolExhausted when none is free."""
        path = Path(os.path.realpath(path))
        for lent in self.lent.values():
            if lent.path == path:
                if writable and not lent.writable:
                    raise ConflictError(f"{path.name} is attached read-only in this pod; it cannot be written")
                if writable and QUARANTINED in lent.users:
                    raise ConflictError(f"{path.name} may still be mounted in this pod's VM from an earlier use; "
                                        "stop the pod before it is used again")
                lent.users.add(user)
                return lent.address
        slot = self._free(writable)
        address = self.disks.attach(slot, path, writable)
        self.lent[slot] = Lent(slot, path, writable, address, {user})
        return address

    def address_of(self, path: str | Path) -> str:
        real = Path(os.path.realpath(path))
        for lent in self.lent.values():
            if lent.path == real:
                return lent.address
        raise KeyError(str(path))

    def release(self, user: str) -> list[str]:
        """What ``user`` held goes; each slot nobody uses any more is freed. A slot whose detach fails is kept
        out of use (quarantined) and the first failure raised once every slot was tried."""
        freed, failure = [], None
        for slot, lent in list(self.lent.items()):
            lent.users.discard(user)
            if lent.users:
                continue
            try:
                self.disks.detach(slot)
            except MicropodError as exc:
                lent.users.add(QUARANTINED)
                failure = failure or exc
                continue
            del self.lent[slot]
            freed.append(slot)
        if failure is not None:
            raise failure
        return freed

    def quarantine(self, user: str) -> None:
        """The guest may still use what ``user`` held (its unmount failed): none of it is lent again or
        swapped to another file while this VM runs."""
        for lent in self.lent.values():
            if user in lent.users:
                lent.users.discard(user)
                lent.users.add(QUARANTINED)

    def _free(self, writable: bool) -> str:
        taken = set(self.lent)
        kind = "writable" if writable else "read-only"
        for slot in self.disks.slot_ids(writable):
            if slot not in taken:
                return slot
        raise PoolExhausted(f"the pod's drive pool is exhausted: no slot is free for a {kind} disk; remove a "
                            "container of the pod, or create the pod with a larger --drive-pool")
