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

    def _store(self) -> contextlib.AbstractContextManager[VolumeStore]:
        return _store(self.root)


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConflictError(f"the volume {path.parent.name} is in use by another running VM") from None
    return fd


class PodVolumes:
    """The named volumes of a pod's containers, held by the pod's VM: a volume that several of them use is
    claimed and locked once, and let go when the VM ends (not when a container is removed: the VMM, or the guest,
    may keep hold of a disk that was taken off the VM, so no other VM may have it before this one is gone)."""

    def __init__(self, root: StateRoot, pod_id: str) -> None:
        self.root, self.pod_id = root, pod_id
        self._locks: dict[str, int] = {}
        self._users: dict[str, set[str]] = {}

    def claim(self, member: str, volumes: tuple[VolumeMount, ...]) -> None:
        if not volumes:
            return
        claimed: list[str] = []
        with _store(self.root) as store:
            try:
                for volume in volumes:
                    store.attach(volume.name, self.pod_id)
                    if volume.name not in self._locks:
                        self._locks[volume.name] = _lock(store.get(volume.name).path)
                    self._users.setdefault(volume.name, set()).add(member)
                    claimed.append(volume.name)
            except BaseException:
                self._let_go(store, member, claimed)
                raise

    def forget(self, member: str) -> None:
        """A removed container names its volumes no longer."""
        with _store(self.root) as store:
            store.release_all(member)

    def release_all(self) -> None:
        for fd in self._locks.values():
            os.close(fd)
        self._locks.clear()
        self._users.clear()
        with _store(self.root) as store:
            store.detach_all(self.pod_id)

    def _let_go(self, store: VolumeStore, member: str, names: list[str]) -> None:
        for name in names:
            users = self._users.get(name, set())
            users.discard(member)
            if not users:
                self._users.pop(name, None)
                fd = self._locks.pop(name, None)
                if fd is not None:
                    os.close(fd)
                store.detach(name, self.pod_id)


@contextlib.contextmanager
def _store(root: StateRoot) -> Iterator[VolumeStore]:
    store = VolumeStore(root.volumes, root.db)
    try:
        yield store
    finally:
        store.close()
