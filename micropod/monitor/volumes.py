"""The container's named volumes, as its monitor holds them for each boot of its VM."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from micropod.errors import ConflictError
from micropod.paths import StateRoot
from micropod.runconfig import VolumeMount
from micropod.volumes import VolumeStore


class VolumeClaims:
    def __init__(self, root: StateRoot, vm_id: str, volumes: tuple[VolumeMount, ...]) -> None:
        self.root, self.vm_id, self.volumes = root, vm_id, volumes
        self._locks: dict[str, int] = {}  # volume -> the flock'ed fd of its disk

    def claim(self) -> None:
        """Each volume attached to this VM (its row), and locked by this monitor (the disk's flock): the row
        says which container has it, the lock that only one monitor runs a VM with it, whatever races the row
        (a `start` during a `cp`'s maintenance boot, a monitor that died without clearing it)."""
        if not self.volumes:
            return
        with self._store() as store:
            for volume in self.volumes:
                store.attach(volume.name, self.vm_id)
                if volume.name not in self._locks:  # a restart's boot keeps the lock it has
                    self._locks[volume.name] = _lock(store.get(volume.name).path)

    def release(self, forget: bool) -> None:
        """The VM holds its volumes no longer; with ``forget`` (the container is removed) it names them no
        longer either."""
        if not self.volumes:
            return
        for fd in self._locks.values():
            os.close(fd)
        self._locks.clear()
        with self._store() as store:
            if forget:
                store.release_all(self.vm_id)
            else:
                store.detach_all(self.vm_id)

    @contextlib.contextmanager
    def _store(self) -> Iterator[VolumeStore]:
        store = VolumeStore(self.root.volumes, self.root.db)
        try:
            yield store
        finally:
            store.close()


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConflictError(f"the volume {path.parent.name} is in use by another running VM") from None
    return fd
