"""Disk usage and pruning of the state root: `system df` and `system prune`, as plain data first.

Sizes are allocated bytes (st_blocks), so a VM's sparse upper.ext4 counts for what it really uses.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from micropod.context import Context
from micropod.runconfig import RunConfig
from micropod.service.reconcile import reconcile
from micropod.state import ACTIVE


@dataclass(frozen=True)
class Usage:
    kind: str
    total: int
    active: int
    size: int
    reclaimable: int


def allocated(path: Path) -> int:
    """Bytes a file or a tree really occupies on disk; missing paths count as 0."""
    total = 0
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_blocks * 512
    except FileNotFoundError:
        return 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def rootfs_in_use(ctx: Context) -> set[Path]:
    used = set()
    for record in ctx.state.all():
        cfg = RunConfig.load_if_present(ctx.root.vm(record.id).config)
        if cfg is not None:
            used.add(Path(cfg.rootfs).resolve())
    return used


def disk_usage(ctx: Context) -> list[Usage]:
    records = reconcile(ctx)
    running = [r for r in records if r.status in ACTIVE]
    container_sizes = {r.id: allocated(ctx.root.vm(r.id).path) for r in records}
    stopped_size = sum(size for vm_id, size in container_sizes.items() if vm_id not in {r.id for r in running})
    bases = sorted(ctx.root.rootfs_dir.glob("*.sqfs")) if ctx.root.rootfs_dir.exists() else []
    used = rootfs_in_use(ctx)
    base_sizes = {p: allocated(p) for p in bases}
    images = list((ctx.root.images / "blobs" / "sha256").glob("*"))
    image_ids = {r.image_id for r in records}
    return [
        Usage("Images", _count_images(ctx), len(image_ids), sum(allocated(p) for p in images), 0),
        Usage("Containers", len(records), len(running), sum(container_sizes.values()), stopped_size),
        Usage("Rootfs cache", len(bases), sum(1 for p in bases if p.resolve() in used), sum(base_sizes.values()),
              sum(size for p, size in base_sizes.items() if p.resolve() not in used)),
        _snapshot_usage(),
    ]


def _snapshot_usage() -> Usage:
    """Boot snapshots: each its guest RAM and its stream (and a root-ready one's pristine layer); active while a
    holder keeps that RAM for running VMs. All reclaimable: a VM restored from one keeps its RAM mapped, and the
    next run saves the snapshot again."""
    from micropod.paths import CacheRoot
    from micropod.vmm import snapshot

    found = snapshot.saved(CacheRoot.from_env())
    size = sum(map(_snapshot_bytes, found))
    return Usage("Boot snapshots", len(found), sum(1 for p in found if snapshot.in_use(p)), size, size)


def _snapshot_bytes(saved: Path) -> int:
    """A boot snapshot's bytes on disk, with what goes with it (a root-ready one's pristine layer)."""
    from micropod.vmm import snapshot

    return sum(allocated(p) for p in (saved, *snapshot.companions(saved)))


def _count_images(ctx: Context) -> int:
    try:
        return len(ctx.images.list())
    except Exception:  # an unreadable store is `system check`'s business, not df's
        return 0


@dataclass(frozen=True)
class Pruned:
    containers: list[str]
    rootfs: list[Path]
    reclaimed: int
    snapshots: list[Path]


def prune(ctx: Context) -> Pruned:
    """Remove stopped containers, then the rootfs bases no remaining container uses."""
    from micropod.service import containers

    removed: list[str] = []
    reclaimed = 0
    for record in reconcile(ctx):
        if record.status in ACTIVE:
            continue
        reclaimed += allocated(ctx.root.vm(record.id).path)
        containers.remove(ctx, record, force=False)
        removed.append(record.id)
    used = rootfs_in_use(ctx)
    bases = []
    for base in sorted(ctx.root.rootfs_dir.glob("*.sqfs")) if ctx.root.rootfs_dir.exists() else []:
        if base.resolve() in used:
            continue
        reclaimed += allocated(base)
        base.unlink(missing_ok=True)
        bases.append(base)
    from micropod.paths import CacheRoot
    from micropod.vmm import rootsnap, snapshot

    cache = CacheRoot.from_env()
    snapshots = snapshot.saved(cache)
    for saved in snapshots:
        reclaimed += _snapshot_bytes(saved)
        snapshot.invalidate(saved)
    rootsnap.forget_digests(cache)
    return Pruned(removed, bases, reclaimed, snapshots)
