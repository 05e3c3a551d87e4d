"""The VMs' table: SQLite with WAL, a busy timeout, and BEGIN IMMEDIATE for every writer.

Any number of CLI processes and monitors use it at once. Rows describe VMs; the files of a VM live in
its VmDir. Reconciliation notices monitors and VMMs that died without recording it.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from micropod.errors import ConflictError, NotFoundError, StateError, UsageError
from micropod.fsutil import private_dir
from micropod.liveness import ProcessRef, ref_of
from micropod.state.db import open_tables
from micropod.state.tables import VMS

# created: recorded, monitor not yet running the container; running: container process started;
# restarting: ended, its monitor waits out the restart policy's backoff before booting it again;
# exited: finished with an exit code; dead: its monitor and VMM vanished without saying how it ended;
# configured: made by `create` and never started (docker's "Created"): no monitor, and none is expected.
STATUSES = ("created", "running", "restarting", "exited", "dead", "configured")
ACTIVE = ("created", "running", "restarting")


@dataclass
class VmRecord:
    id: str
    name: str
    image: str
    image_id: str
    command: str
    created: float
    status: str
    started: float | None = None
    finished: float | None = None
    exit_code: int | None = None
    error: str | None = None
    monitor_pid: int | None = None
    monitor_start: int | None = None
    vmm_pid: int | None = None
    vmm_start: int | None = None
    auto_remove: int = 0
    backend: str = ""
    restart_count: int = 0
    pod: str = ""  # the id of the pod whose VM runs it; '' for a container with a VM of its own

    @property
    def argv(self) -> list[str]:
        value = json.loads(self.command)
        return [str(v) for v in value]

    @property
    def monitor(self) -> ProcessRef | None:
        return ref_of(self.monitor_pid, self.monitor_start)

    @property
    def vmm(self) -> ProcessRef | None:
        return ref_of(self.vmm_pid, self.vmm_start)

    @property
    def short_id(self) -> str:
        return self.id[:12]


_COLUMNS = tuple(f.name for f in fields(VmRecord))


class StateStore:
    """One connection to state.db; cheap to create, one per process."""

    def __init__(self, db: Path) -> None:
        self.path = db
        try:
            private_dir(db.parent)
            self._conn = open_tables(db, VMS)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            raise StateError(f"state store {db}: {exc}") from exc

    def close(self) -> None:
        self._conn.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A writer transaction, taken up front so concurrent writers queue instead of deadlocking."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StateError(f"state store {self.path}: {exc}") from exc
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            self._conn.execute("COMMIT")

    def insert(self, record: VmRecord) -> None:
        values = {c: getattr(record, c) for c in _COLUMNS}
        try:
            with self.write() as conn:
                conn.execute(
                    f"INSERT INTO vms ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                    tuple(values.values()),
                )
        except sqlite3.IntegrityError as exc:
            if "name" in str(exc):
                raise name_in_use(record.name) from exc
            raise StateError(f"cannot record VM {record.id}: {exc}") from exc

    def update(self, vm_id: str, **changes: Any) -> None:
        unknown = set(changes) - set(_COLUMNS)
        if unknown:
            raise StateError(f"unknown VM fields {sorted(unknown)}")
        assignments = ", ".join(f"{k} = ?" for k in changes)
        with self.write() as conn:
            conn.execute(f"UPDATE vms SET {assignments} WHERE id = ?", (*changes.values(), vm_id))

    def update_if(self, vm_id: str, expect_status: tuple[str, ...], **changes: Any) -> bool:
        """Change a row only while it still has one of the expected statuses (a compare-and-set)."""
        assignments = ", ".join(f"{k} = ?" for k in changes)
        marks = ", ".join("?" * len(expect_status))
        with self.write() as conn:
            cur = conn.execute(
                f"UPDATE vms SET {assignments} WHERE id = ? AND status IN ({marks})",
                (*changes.values(), vm_id, *expect_status),
            )
            return cur.rowcount == 1

    def delete(self, vm_id: str) -> None:
        with self.write() as conn:
            conn.execute("DELETE FROM vms WHERE id = ?", (vm_id,))

    def get(self, vm_id: str) -> VmRecord | None:
        row = self._conn.execute("SELECT * FROM vms WHERE id = ?", (vm_id,)).fetchone()
        return _record(row) if row else None

    def all(self) -> list[VmRecord]:
        rows = self._conn.execute("SELECT * FROM vms ORDER BY created DESC").fetchall()
        return [_record(r) for r in rows]

    def find(self, ident: str) -> VmRecord:
        """Look a VM up by name, full id, or unique id prefix, as docker does."""
        if not ident:
            raise UsageError("empty container name or id")
        rows = self._conn.execute(
            "SELECT * FROM vms WHERE name = ? OR id = ? OR id LIKE ? ESCAPE '\\'",
            (ident.lstrip("/"), ident, f"{escape_like(ident)}%"),
        ).fetchall()
        records = [_record(r) for r in rows]
        exact = [r for r in records if r.name == ident.lstrip("/")] or [r for r in records if r.id == ident]
        if exact:
            return exact[0]
        if len(records) == 1:
            return records[0]
        if not records:
            raise NotFoundError(f"No such container: {ident}")
        raise UsageError(f"multiple containers match id prefix {ident!r}; give more characters")

    def published_ports(self) -> dict[str, list[dict[str, Any]]]:
        """Every attached VM's published ports, from one query (``ps`` must not read a file per VM)."""
        try:
            rows = self._conn.execute("SELECT vm_id, ports FROM attachments").fetchall()
        except sqlite3.OperationalError:  # nothing was ever attached in this root
            return {}
        return {row["vm_id"]: json.loads(row["ports"]) for row in rows}

    def name_taken(self, name: str) -> bool:
        return self._conn.execute("SELECT 1 FROM vms WHERE name = ?", (name,)).fetchone() is not None

    def reconcile(self) -> list[VmRecord]:
        """Mark VMs whose monitor and VMM both vanished as dead; return every record, fresh."""
        records = self.all()
        for record in records:
            if record.status not in ACTIVE:
                continue
            if _alive(record.monitor) or _alive(record.vmm):
                continue
            if record.monitor is None and time.time() - record.created < 30:
                continue  # still being launched by its CLI
            changed = self.update_if(
                record.id, ACTIVE, status="dead", finished=time.time(),
                error="the monitor and the VMM vanished without recording an exit",
            )
            if changed:
                record.status = "dead"
        return self.all()


def name_in_use(name: str) -> ConflictError:
    return ConflictError(f'the container name "/{name}" is already in use; remove it or choose another name')


def _alive(ref: ProcessRef | None) -> bool:
    return ref is not None and ref.alive()


def escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _record(row: sqlite3.Row) -> VmRecord:
    return VmRecord(**{k: row[k] for k in row.keys()})  # noqa: SIM118
