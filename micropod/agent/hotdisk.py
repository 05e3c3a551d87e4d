"""Disks a pod's container gets after boot, by the address the host gives: ``/dev/vdX`` for a placeholder drive
whose file the host swapped (Firecracker's PATCH /drives), or ``scsi:N`` for a SCSI disk hot-added at target N of
the VM's one virtio-scsi controller (QEMU). The kernel learns of either asynchronously, so the agent waits,
bounded, until the device is there with the size the host announced, and drops whatever it cached of the
device's previous file; then the container's spec names the device nodes."""

from __future__ import annotations

import os
import time

from micropod import syscalls
from micropod.agent.errors import RequestError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_WAIT = 10.0
_SECTOR = 512
_SCSI_DEVICES = "/sys/bus/scsi/devices"
_SYS_BLOCK = "/sys/block"


def resolve(disks: object) -> dict[str, str]:
    """Each announced address's device node, once it is there with its size."""
    if not isinstance(disks, dict) or len(disks) > 64:
        raise RequestError("disks must be an object of at most 64 addresses")
    deadline = time.monotonic() + _WAIT
    found = {}
    for address, size in disks.items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RequestError(f"invalid size for {address}: {size!r}")
        while True:
            name = _block_name(address)
            if name is not None and _sectors(name) * _SECTOR == size - size % _SECTOR:
                break
            if time.monotonic() > deadline:
                have = "is not there" if name is None else f"has {_sectors(name) * _SECTOR} bytes, not {size}"
                raise RequestError(f"the disk at {address} {have} after {_WAIT:.0f}s")
            time.sleep(0.002)
        device = f"/dev/{name}"
        syscalls.flush_block_device(device)
        found[address] = device
    return found


def substitute(spec: dict[str, Any], devices: dict[str, str]) -> None:
    """The container's disks by their device nodes."""
    rootfs = spec.get("rootfs")
    if isinstance(rootfs, dict):
        for key in ("lower", "upper"):
            if rootfs.get(key) in devices:
                rootfs[key] = devices[rootfs[key]]
    for volume in spec.get("volumes") or []:
        if isinstance(volume, dict) and volume.get("device") in devices:
            volume["device"] = devices[volume["device"]]


def _block_name(address: object) -> str | None:
    """The kernel's name of the disk at ``address``; None while it has not appeared."""
    if isinstance(address, str) and len(address) == 8 and address.startswith("/dev/vd") and "a" <= address[7] <= "z":
        return address[5:]
    if not isinstance(address, str) or not address.startswith("scsi:") or not address[5:].isdigit() \
            or int(address[5:]) > 255:
        raise RequestError(f"invalid disk address {address!r}")
    target = f":0:{int(address[5:])}:0"
    try:
        entries = os.listdir(_SCSI_DEVICES)
    except FileNotFoundError:
        return None
    for entry in entries:
        if entry.endswith(target) and entry.count(":") == 3:
            try:
                names = os.listdir(f"{_SCSI_DEVICES}/{entry}/block")
            except FileNotFoundError:
                return None
            return names[0] if len(names) == 1 and names[0].isalnum() else None
    return None


def _sectors(name: str) -> int:
    try:
        with open(f"{_SYS_BLOCK}/{name}/size") as f:
            return int(f.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        return -1
