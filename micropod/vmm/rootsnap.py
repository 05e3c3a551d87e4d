"""Snapshots taken once a container's root is ready (issue 14): its mounts are made once per image and shape.

The first boot of a container of an image, on a machine shape, saves a template that boots with that image's
base and a pristine writable layer, has its agent mount them as a container's root (the base, the layer, the
overlay, /proc, /sys, /dev), and is saved there. Each later first boot of a container of that image restores it
behind its own byte-identical copy of the pristine layer (a sparse copy), so its agent adopts the mounted root
and only starts the command: the layer's mkfs, the disks' cache flush and the mounts are not redone. What makes a
VM distinct is redone as after any restore (snapshot.py): the RNG reseed and the clock on ``restore``, the
address on ``network``, the hostname on ``create``, the environment, user and process on ``start``.

The snapshot's key adds the image's base, by the SHA-256 of its bytes, and the layer's size to the machine
shape's, so a rebuilt image never restores another's root, while the same image's base in another state root (a
byte-identical file: tar2sqfs is deterministic) shares the snapshot. The digest is computed once per base file
(its path, inode, size, modification and change times) and kept in the snapshot directory. Only a container's
first boot, with no volumes or binds (they are mounted at create), restores one: a restarted container has its
own layer, and boots from the machine shape's plain snapshot.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from micropod import guestmsg, wire
from micropod.errors import BootError
from micropod.fsutil import atomic_write, copy_sparse, flock, private_dir, private_file
from micropod.paths import CacheRoot, switched_on
from micropod.vmm import guestram, snapshot
from micropod.vmm.base import VmSpec
from micropod.vmm.guestram import lock_of

if TYPE_CHECKING:
    from micropod.vmm.snapshot import QemuFactory

log = logging.getLogger("micropod")

PREPARE_TIMEOUT = 60.0
_PREPARE_REQ = 1
_DIGESTS_KEPT = 256
_READ_CHUNK = 1 << 20


def enabled() -> bool:
    """MICROPOD_ROOT_SNAPSHOTS=0 keeps boot snapshots only (MICROPOD_SNAPSHOTS=0 turns both off)."""
    return switched_on("MICROPOD_ROOT_SNAPSHOTS")


@dataclass(frozen=True)
class FreshRoot:
    """A container's first boot: its writable layer does not exist yet; ``make`` makes it empty (mkfs) at
    ``upper`` with ``size`` bytes when no root-ready snapshot serves."""

    cid: str  # the container's id in the agent
    upper: Path
    size: int
    make: Callable[[Path, int], None]

    def ensure_layer(self) -> None:
        if not self.upper.exists():
            self.make(self.upper, self.size)


@dataclass
class RootTemplate:
    """A root-ready template (snapshot.TemplateSetup): the image's base and a pristine layer, mounted by its agent
    as container ``cid``'s root before it is saved."""

    fresh: FreshRoot
    rootfs: dict[str, str]  # the agent's rootfs spec: the guest's devices of the base and the layer
    base_drive: str
    base: Path
    upper_drive: str
    pristine: Path | None = None

    def disks(self, workdir: Path) -> dict[str, Path]:
        self.pristine = workdir / "pristine.upper"
        self.fresh.make(self.pristine, self.fresh.size)
        return {self.base_drive: self.base, self.upper_drive: self.pristine}

    def prepare(self, channel: socket.socket) -> None:
        """The agent mounts the container's root; its ``ok`` is the answer to wait for."""
        channel.sendall(wire.encode_control({"op": wire.GuestOp.CREATE, "req": _PREPARE_REQ, "id": self.fresh.cid,
                                             "spec": {"rootfs": self.rootfs}, "prepare": True}))
        deadline = time.monotonic() + PREPARE_TIMEOUT
        while True:
            channel.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                kind, _, payload = wire.recv_frame(channel)
                message = guestmsg.parse(payload) if kind == wire.CONTROL else None
            except (OSError, wire.FrameError, guestmsg.BadGuestMessage) as exc:
                raise BootError(f"the root-ready template did not mount its root: {exc}") from exc
            if isinstance(message, guestmsg.Reply) and message.req == _PREPARE_REQ:
                if not message.ok:
                    raise BootError(f"the root-ready template refused to mount its root: {message.message}")
                return

    def commit(self, target: Path) -> None:
        assert self.pristine is not None
        with open(self.pristine, "rb") as layer:
            os.fsync(layer.fileno())
        os.replace(self.pristine, pristine_layer(target))


def pristine_layer(saved: Path) -> Path:
    return snapshot.companions(saved)[0]


def root_key(spec: VmSpec, shape: list[str], binary: Path, template: RootTemplate, digests: Path) -> str:
    return snapshot.snapshot_key(spec, shape, binary, sizes={template.upper_drive: template.fresh.size},
                                 extra=("root-ready", content_digest(template.base, digests),
                                        json.dumps(template.rootfs, sort_keys=True)))


def digests_dir(cache: CacheRoot) -> Path:
    return snapshot.snapshot_dir(cache) / "bases"


def forget_digests(cache: CacheRoot) -> None:
    """The remembered digests go with the snapshots (system prune)."""
    directory = digests_dir(cache)
    if directory.is_dir() and not directory.is_symlink():
        for memo in filter(_is_memo, directory.iterdir()):
            memo.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # another run is writing one meanwhile
            directory.rmdir()


def content_digest(path: Path, digests: Path) -> str:
    """The SHA-256 of ``path``'s bytes, remembered in ``digests`` under the file's identity (so a replaced file is
    hashed again); at most _DIGESTS_KEPT are remembered, the oldest forgotten first."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        identity = hashlib.sha256(f"{path}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
                                  .encode()).hexdigest()
        memo = private_dir(digests) / identity
        with contextlib.suppress(OSError):
            known = memo.read_text()
            if _is_sha256_hex(known):
                return known
        digest = hashlib.sha256()
        while chunk := os.read(fd, _READ_CHUNK):
            digest.update(chunk)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):  # remembering is best-effort: a full disk costs a hash next time
        atomic_write(memo, digest.hexdigest().encode(), mode=0o600)
        _forget_oldest(digests)
    return digest.hexdigest()


def _is_sha256_hex(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _is_memo(path: Path) -> bool:
    return _is_sha256_hex(path.name)


def _forget_oldest(digests: Path) -> None:
    """At most _DIGESTS_KEPT memos; another run's temporary file or a memo gone meanwhile is no error."""
    dated = []
    for memo in filter(_is_memo, digests.iterdir()):
        with contextlib.suppress(FileNotFoundError):
            dated.append((memo.stat().st_mtime_ns, memo))
    for _, stale in sorted(dated)[:-_DIGESTS_KEPT]:
        stale.unlink(missing_ok=True)


def restore_root(vmm_factory: QemuFactory, spec: VmSpec, key: str,
                 template: RootTemplate) -> tuple[Path, int] | None:
    """The root-ready snapshot (built if missing), opened, with its pristine layer copied to the container's:
    both taken under the snapshot's lock, so the layer is the one saved with that snapshot file even if another
    run drops and rebuilds it meanwhile (QEMU gets the open descriptor). None, with nothing made, when none can
    serve."""
    saved = snapshot.ensure_snapshot(vmm_factory, spec, key, setup=template)
    if saved is None:
        return None
    with flock(lock_of(saved)):
        try:
            opened = os.open(saved, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:  # dropped since: the plain snapshot serves
            return None
        try:
            copied = _copy_pristine(saved, template.fresh.upper)
        except BaseException:
            os.close(opened)
            raise
    if not copied:
        os.close(opened)
        return None
    return saved, opened


def _copy_pristine(saved: Path, upper: Path) -> bool:
    """The snapshot's pristine layer, copied sparse to ``upper`` (made here: O_EXCL, 0600); on a failure (False),
    nothing is left at ``upper`` (and a snapshot without its layer is dropped)."""
    try:
        source = os.open(pristine_layer(saved), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("the root-ready snapshot has no pristine layer (%s); dropping it", exc.strerror)
        with contextlib.suppress(FileNotFoundError):
            saved.unlink()
        guestram.release(saved)
        return False
    try:
        target = private_file(upper, os.O_WRONLY | os.O_EXCL)
        try:
            copy_sparse(source, target, os.fstat(source).st_size)
        except BaseException:
            os.close(target)
            upper.unlink(missing_ok=True)
            raise
        os.close(target)
    except OSError as exc:
        log.warning("cannot copy the root-ready snapshot's layer (%s); booting from the plain snapshot", exc)
        return False
    finally:
        os.close(source)
    return True
