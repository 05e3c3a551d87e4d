"""The pods' table: one row per pod, the VM that holds a group of containers (their rows name it in
``vms.pod``). The pod's own files (its config, sockets and logs) live in its PodDir."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from micropod.errors import ConflictError, NotFoundError, StateError, UsageError
from micropod.liveness import ProcessRef, ref_of
from micropod.state.db import open_tables
from micropod.state.tables import PODS
from micropod.state.vms import escape_like

# created: made by `pod create`, never started (podman's Created); starting: its monitor boots the VM;
# running: the VM is up and takes containers; stopped: its VM was powered off (`pod stop`, or it failed);
# dead: its monitor and VMM vanished without recording an end.
POD_STATUSES = ("created", "starting", "running", "stopped", "dead")
POD_ACTIVE = ("starting", "running")


@dataclass
class PodRecord:
    id: str
    name: str
    created: float
    status: str
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    labels: str = "{}"
    monitor_pid: int | None = None
    monitor_start: int | None = None
    vmm_pid: int | None = None
    vmm_start: int | None = None

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def label_map(self) -> dict[str, str]:
        value = json.loads(self.labels)
        return {str(k): str(v) for k, v in value.items()}

    @property
    def monitor(self) -> ProcessRef | None:
        return ref_of(self.monitor_pid, self.monitor_start)

    @property
    def vmm(self) -> ProcessRef | None:
        return ref_of(self.vmm_pid, self.vmm_start)


_COLUMNS = tuple(f.name for f in fields(PodRecord))


class PodStore:
    """The pods' rows in state.db; one connection, cheap to open."""

    def __init__(self, db: Path) -> None:
        self.path = db
        self._conn = open_tables(db, PODS)
        self._conn.row_factory = sqlite3.Row

    def close(self) -> None:
        self._conn.close()

    def _write(self, sql: str, values: tuple[Any, ...]) -> int:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cur = self._conn.execute(sql, values)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise StateError(f"state store {self.path}: {exc}") from exc
        return cur.rowcount

    def insert(self, record: PodRecord) -> None:
        values = tuple(getattr(record, c) for c in _COLUMNS)
        try:
            self._write(f"INSERT INTO pods ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                        values)
        except sqlite3.IntegrityError as exc:
            if "name" in str(exc):
                raise pod_name_in_use(record.name) from exc
            raise StateError(f"cannot record pod {record.id}: {exc}") from exc

    def update(self, pod_id: str, **changes: Any) -> None:
        self.update_if(pod_id, POD_STATUSES, **changes)

    def update_if(self, pod_id: str, expect_status: tuple[str, ...], **changes: Any) -> bool:
        unknown = set(changes) - set(_COLUMNS)
        if unknown:
            raise StateError(f"unknown pod fields {sorted(unknown)}")
        assignments = ", ".join(f"{k} = ?" for k in changes)
        marks = ", ".join("?" * len(expect_status))
        return self._write(f"UPDATE pods SET {assignments} WHERE id = ? AND status IN ({marks})",
                           (*changes.values(), pod_id, *expect_status)) == 1

    def delete(self, pod_id: str) -> None:
        self._write("DELETE FROM pods WHERE id = ?", (pod_id,))

    def get(self, pod_id: str) -> PodRecord | None:
        row = self._conn.execute("SELECT * FROM pods WHERE id = ?", (pod_id,)).fetchone()
        return _record(row) if row else None

    def all(self) -> list[PodRecord]:
        return [_record(r) for r in self._conn.execute("SELECT * FROM pods ORDER BY created DESC").fetchall()]

    def name_taken(self, name: str) -> bool:
        return self._conn.execute("SELECT 1 FROM pods WHERE name = ?", (name,)).fetchone() is not None

    def find(self, ident: str) -> PodRecord:
        """By name, full id or unique id prefix, as podman does."""
        if not ident:
            raise UsageError("empty pod name or id")
        rows = self._conn.execute(
            "SELECT * FROM pods WHERE name = ? OR id = ? OR id LIKE ? ESCAPE '\\'",
            (ident, ident, f"{escape_like(ident)}%"),
        ).fetchall()
        records = [_record(r) for r in rows]
        exact = [r for r in records if ident in (r.name, r.id)]
        if exact:
            return exact[0]
        if len(records) == 1:
            return records[0]
        if not records:
            raise NotFoundError(f"no such pod: {ident}")
        raise UsageError(f"multiple pods match id prefix {ident!r}; give more characters")

    def reconcile(self) -> list[PodRecord]:
        """Pods whose monitor and VMM both vanished are dead; every record, fresh."""
        for record in self.all():
            if record.status not in POD_ACTIVE:
                continue
            if any(ref is not None and ref.alive() for ref in (record.monitor, record.vmm)):
                continue
            if record.monitor is None and time.time() - record.created < 30:
                continue  # still being launched
            self.update_if(record.id, POD_ACTIVE, status="dead", finished=time.time(),
                           error="the pod's monitor and VMM vanished without recording an end")
        return self.all()


def pod_name_in_use(name: str) -> ConflictError:
    return ConflictError(f'the pod name "{name}" is already in use; remove it or choose another name')


def _record(row: sqlite3.Row) -> PodRecord:
    return PodRecord(**{k: row[k] for k in row.keys()})  # noqa: SIM118
