"""A running QEMU's block nodes over QMP: the names micropod gives them, and a drive pointed at another file."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from micropod.errors import VmmError
from micropod.vmm.qmp import QmpClient


def format_node(drive_id: str) -> str:
    """The block node name of a drive's raw format layer, which a swap of its file reopens."""
    return f"fmt-{drive_id}"


def swap_backing_file(qmp: QmpClient, drive_id: str, path: Path, read_only: bool, generation: int) -> None:
    """Point a running VM's drive at another file, as Firecracker's PATCH /drives does: QEMU microvm has no
    virtio-mmio hotplug, so a later disk goes onto a placeholder drive the VM booted with. A new file node
    is added and the raw node reopened on it (about 12 ms here); the guest is told a new capacity if the
    size differs, and must drop what it cached of the device before it reads it."""
    node = f"file-{drive_id}-{generation}"
    added: dict[str, Any] = {"driver": "file", "filename": str(path), "node-name": node, "read-only": read_only}
    qmp.execute("blockdev-add", **added)
    try:
        qmp.execute("blockdev-reopen", options=[{"driver": "raw", "node-name": format_node(drive_id),
                                                 "file": node, "read-only": read_only}])
    except VmmError:
        qmp.execute("blockdev-del", **node_ref(node))
        raise
    if generation > 0:  # the file node the previous swap added; the one -drive made goes by itself
        with contextlib.suppress(VmmError):
            qmp.execute("blockdev-del", **node_ref(f"file-{drive_id}-{generation - 1}"))
    qmp.execute("block_resize", **node_ref(format_node(drive_id)), size=path.stat().st_size)


def node_ref(name: str) -> dict[str, Any]:
    return {"node-name": name}
