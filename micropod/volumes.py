"""Named volumes, as docker's ``local`` driver keeps them but as block devices: each volume is a sparse ext4
image (<root>/volumes/<name>/volume.ext4, private), attached to a VM as a disk, so that it works alike on
QEMU and Firecracker and its data outlives every container.

A volume is attached to one running VM at a time (an ext4 mounted by two kernels at once corrupts it); the
claim is a compare-and-set on its row. Containers that name a volume, running or not, keep it from being
removed, as docker's do.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from micropod.errors import ConflictError, NotFoundError, StateError, UsageError
from micropod.fsutil import private_dir
from micropod.rootfs.upper import MIN_UPPER_SIZE, create_upper
from micropod.state.db import open_tables
from micropod.state.tables import VOLUMES

# docker's rule for volume names; an anonymous volume is named by 64 hex digits.
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{1,254}")
DEFAULT_VOLUME_SIZE = 10 << 30  # sparse: it costs what the containers write
VOLUME_FILE = "volume.ext4"


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise UsageError(f'invalid volume name "{name}": only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed, '
                         "at least two characters")
    return name


@dataclass(frozen=True)
class VolumeRequest:
    """-v NAME:/path[:ro] or --mount type=volume,...: the volume ``name`` at ``target`` in the container."""

    name: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class Volume:
    name: str
    created: float
    size: int
    path: Path
    labels: dict[str, str] = field(default_factory=dict)
    anonymous: bool = False
    holder: str | None = None  # the VM it is attached to
    users: tuple[str, ...] = ()  # the containers that name it

    def inspect(self) -> dict[str, Any]:
        """docker volume inspect's document."""
        return {"CreatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)), "Driver": "local",
                "Labels": dict(self.labels), "Mountpoint": str(self.path), "Name": self.name,
                "Options": {"size": str(self.size)}, "Scope": "local",
                "UsageData": {"RefCount": len(self.users), "AttachedTo": self.holder}}


class VolumeStore:
    def __init__(self, root: Path, db: Path) -> None:
        self.root = root
        self._conn = open_tables(db, VOLUMES)
        self._conn.row_factory = sqlite3.Row

    def close(self) -> None:
        self._conn.close()

    def _file(self, name: str) -> Path:
        return self.root / check_name(name) / VOLUME_FILE

    def create(self, name: str | None = None, size: int = DEFAULT_VOLUME_SIZE,
               labels: dict[str, str] | None = None) -> Volume:
        """A new volume; an existing name is returned as it is, as docker does."""
        anonymous = name is None
        name = check_name(secrets.token_hex(32) if name is None else name)
        if size < MIN_UPPER_SIZE:
            raise UsageError(f"volume size {size} is below the minimum of {MIN_UPPER_SIZE >> 20} MiB")
        existing = self.find(name)
        if existing is not None:
            return existing
        directory = self.root / name
        private_dir(self.root)
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            # A directory without a row: a create that crashed before it recorded the volume.
            shutil.rmtree(directory)
            directory.mkdir(mode=0o700)
        try:
            create_upper(directory / VOLUME_FILE, size)
            with self._write() as conn:
                conn.execute("INSERT INTO volumes (name, created, size, labels, anonymous) VALUES (?, ?, ?, ?, ?)",
                             (name, time.time(), size, json.dumps(labels or {}), int(anonymous)))
        except sqlite3.IntegrityError:
            shutil.rmtree(directory, ignore_errors=True)  # a concurrent create of the same name won
            found = self.find(name)
            if found is None:
                raise StateError(f"volume {name}: created and removed concurrently") from None
            return found
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return self.get(name)

    def find(self, name: str) -> Volume | None:
        row = self._conn.execute("SELECT * FROM volumes WHERE name = ?", (check_name(name),)).fetchone()
        return None if row is None else self._volume(row)

    def get(self, name: str) -> Volume:
        found = self.find(name)
        if found is None:
            raise NotFoundError(f"no such volume: {name}")
        return found

    def all(self) -> list[Volume]:
        return [self._volume(row) for row in self._conn.execute("SELECT * FROM volumes ORDER BY name")]

    def _volume(self, row: sqlite3.Row) -> Volume:
        users = tuple(r[0] for r in self._conn.execute(
            "SELECT vm_id FROM volume_users WHERE volume = ? ORDER BY vm_id", (row["name"],)))
        return Volume(name=row["name"], created=row["created"], size=row["size"], path=self._file(row["name"]),
                      labels=json.loads(row["labels"]), anonymous=bool(row["anonymous"]), holder=row["holder"],
                      users=users)

    def remove(self, name: str, force: bool = False) -> bool:
        """Remove an unused volume; False if there was none and ``force`` asked not to mind (docker's -f)."""
        with self._write() as conn:
            row = conn.execute("SELECT holder FROM volumes WHERE name = ?", (check_name(name),)).fetchone()
            if row is None:
                if force:
                    return False
                raise NotFoundError(f"no such volume: {name}")
            users = [r[0][:12] for r in conn.execute("SELECT vm_id FROM volume_users WHERE volume = ?", (name,))]
            if users or row["holder"]:
                raise ConflictError(f"remove {name}: volume is in use - [{', '.join(users or [row['holder'][:12]])}]")
            conn.execute("DELETE FROM volumes WHERE name = ?", (name,))
        shutil.rmtree(self.root / name, ignore_errors=True)
        return True

    def prune(self, include_named: bool = False) -> list[str]:
        """Remove unused volumes: anonymous ones, and named ones too with ``include_named`` (docker's -a)."""
        removed = []
        for volume in self.all():
            if (volume.anonymous or include_named) and not volume.users and volume.holder is None:
                with contextlib.suppress(ConflictError, NotFoundError):  # taken or removed meanwhile
                    if self.remove(volume.name):
                        removed.append(volume.name)
        return removed

    def use(self, name: str, vm_id: str) -> Volume:
        """Record that the container ``vm_id`` names the volume (it can no longer be removed)."""
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM volumes WHERE name = ?", (check_name(name),)).fetchone() is None:
                raise NotFoundError(f"no such volume: {name}")
            conn.execute("INSERT OR IGNORE INTO volume_users (volume, vm_id) VALUES (?, ?)", (name, vm_id))
        return self.get(name)

    def release_all(self, vm_id: str) -> None:
        """The container is gone: it names no volume and holds none."""
        with self._write() as conn:
            conn.execute("DELETE FROM volume_users WHERE vm_id = ?", (vm_id,))
            conn.execute("UPDATE volumes SET holder = NULL WHERE holder = ?", (vm_id,))

    def attach(self, name: str, vm_id: str) -> Volume:
        """Claim the volume for the VM ``vm_id``; ConflictError while another VM has it."""
        with self._write() as conn:
            done = conn.execute("UPDATE volumes SET holder = ? WHERE name = ? AND (holder IS NULL OR holder = ?)",
                                (vm_id, check_name(name), vm_id)).rowcount
            if not done:
                row = conn.execute("SELECT holder FROM volumes WHERE name = ?", (name,)).fetchone()
                if row is None:
                    raise NotFoundError(f"no such volume: {name}")
                raise ConflictError(f"volume {name} is attached to container {row['holder'][:12]}: a volume is "
                                    "attached to one running VM at a time")
        return self.get(name)

    def detach_all(self, vm_id: str) -> None:
        """The VM has ended: it holds none of its volumes (its container still names them)."""
        with self._write() as conn:
            conn.execute("UPDATE volumes SET holder = NULL WHERE holder = ?", (vm_id,))

    def detach(self, name: str, vm_id: str) -> None:
        with self._write() as conn:
            conn.execute("UPDATE volumes SET holder = NULL WHERE name = ? AND holder = ?", (check_name(name), vm_id))

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
