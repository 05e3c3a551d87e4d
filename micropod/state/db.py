"""state.db, one SQLite file per state root holding every table, and the one way its tables are migrated.

Each table is declared once (micropod/state/tables.py) as the steps that build it, in order; the number of
steps applied is its version, recorded in ``schema_versions``. Opening a table applies the steps it lacks,
under the database's write lock, so that concurrent openers neither race nor apply a step twice. A database
from before versioning starts at version 0, and every step is written to be harmless on a table that already
has its effect (``CREATE TABLE IF NOT EXISTS``, a column added only when absent). A table newer than this
micropod knows is refused, never guessed at.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from micropod.errors import StateError
from micropod.fsutil import make_private

BUSY_TIMEOUT = 30.0


@dataclass(frozen=True)
class Statement:
    """SQL run as it is; it must be idempotent (``IF NOT EXISTS``)."""

    sql: str


@dataclass(frozen=True)
class AddColumn:
    """A column added after the table first shipped: ALTER TABLE, unless the column is there already."""

    column: str
    definition: str


@dataclass(frozen=True)
class Table:
    name: str
    steps: tuple[Statement | AddColumn, ...]

    @property
    def version(self) -> int:
        return len(self.steps)


def connect(db: Path) -> sqlite3.Connection:
    """A connection as every user of state.db needs one: autocommit, WAL, waiting out other writers.

    Setting up a connection can meet a lock that SQLite's busy handler does not wait for (a fresh
    connection asking for WAL while others open the file), so that part is retried, within bounds.
    """
    try:
        # Before SQLite makes it with the umask's mode: -wal and -shm take the database's, so 0600 covers all
        # three, whichever of the stores opens it first.
        make_private(db)
    except OSError as exc:
        raise StateError(f"state store {db}: {exc.strerror or exc}") from exc
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            return _open(db)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise StateError(f"state store {db}: {exc}") from exc
            time.sleep(0.01)
        except sqlite3.Error as exc:
            raise StateError(f"state store {db}: {exc}") from exc


def open_tables(db: Path, *tables: Table) -> sqlite3.Connection:
    """A connection with ``tables`` at their current versions."""
    conn = connect(db)
    try:
        for table in tables:
            migrate(conn, table, db)
    except BaseException:
        conn.close()
        raise
    return conn


def _open(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, timeout=BUSY_TIMEOUT, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        # WAL is a property of the file: ask for it only while the file is not in WAL yet.
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
    except BaseException:
        conn.close()
        raise
    return conn


def table_version(conn: sqlite3.Connection, name: str) -> int:
    try:
        row = conn.execute("SELECT version FROM schema_versions WHERE name = ?", (name,)).fetchone()
    except sqlite3.OperationalError:  # no schema_versions yet: a new database, or one from before versions
        return 0
    return int(row[0]) if row else 0


def migrate(conn: sqlite3.Connection, table: Table, db: Path) -> None:
    """Bring ``table`` to its version. The check needs no lock (every command opens tables); a change
    takes the write lock and looks again, as another process may have migrated meanwhile."""
    try:
        if _checked(table_version(conn, table.name), table, db) == table.version:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_versions (name TEXT PRIMARY KEY, version INTEGER NOT NULL)")
            version = _checked(table_version(conn, table.name), table, db)
            for step in table.steps[version:]:
                _apply(conn, table.name, step)
            conn.execute("INSERT INTO schema_versions (name, version) VALUES (?, ?) "
                         "ON CONFLICT (name) DO UPDATE SET version = excluded.version", (table.name, table.version))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise StateError(f"state store {db}: migrating the {table.name} table: {exc}") from exc


def _checked(version: int, table: Table, db: Path) -> int:
    if version > table.version:
        raise StateError(f"state store {db}: the {table.name} table is at version {version}, newer than this "
                         f"micropod knows ({table.version}); use the micropod that wrote it, or a newer one")
    return version


def _apply(conn: sqlite3.Connection, name: str, step: Statement | AddColumn) -> None:
    if isinstance(step, Statement):
        conn.execute(step.sql)
        return
    present = {row[1] for row in conn.execute(f"PRAGMA table_info({name})")}
    if step.column not in present:
        conn.execute(f"ALTER TABLE {name} ADD COLUMN {step.column} {step.definition}")
