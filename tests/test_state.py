import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from micropod.errors import ConflictError, NotFoundError, UsageError
from micropod.liveness import ProcessRef
from micropod.state import StateStore, VmRecord


def record(vm_id: str, name: str, **kw: object) -> VmRecord:
    fields: dict[str, object] = dict(id=vm_id, name=name, image="hello", image_id="ab" * 32,
                                     command=json.dumps(["true"]), created=time.time(), status="created")
    fields.update(kw)
    return VmRecord(**fields)  # type: ignore[arg-type]


def test_insert_find_by_name_id_and_prefix(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    store.insert(record("a" * 64, "web"))
    store.insert(record("b" * 64, "db"))
    assert store.find("web").id == "a" * 64
    assert store.find("/web").id == "a" * 64
    assert store.find("bbbb").name == "db"
    assert store.find("b" * 64).name == "db"
    with pytest.raises(NotFoundError, match="No such container: nope"):
        store.find("nope")


def test_ambiguous_prefix_and_like_wildcards(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    store.insert(record("ab" + "0" * 62, "one"))
    store.insert(record("ab" + "1" * 62, "two"))
    with pytest.raises(UsageError, match="multiple"):
        store.find("ab")
    with pytest.raises(NotFoundError):
        store.find("%")


def test_duplicate_name_is_a_conflict(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    store.insert(record("a" * 64, "web"))
    with pytest.raises(ConflictError, match='name "/web" is already in use'):
        store.insert(record("b" * 64, "web"))
    assert [r.id for r in store.all()] == ["a" * 64]


def test_update_if_is_compare_and_set(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    store.insert(record("a" * 64, "web", status="running"))
    assert store.update_if("a" * 64, ("running",), status="exited", exit_code=3)
    assert not store.update_if("a" * 64, ("running",), status="dead")
    got = store.get("a" * 64)
    assert got is not None and got.status == "exited" and got.exit_code == 3


def test_reconcile_marks_vanished_vm_dead(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    # A monitor reference to a process that is certainly gone: our pid with a wrong start time.
    store.insert(record("a" * 64, "ghost", status="running", monitor_pid=os.getpid(), monitor_start=1))
    me = ProcessRef.of(os.getpid())
    assert me is not None
    store.insert(record("b" * 64, "alive", status="running", monitor_pid=me.pid, monitor_start=me.started))
    by_name = {r.name: r for r in store.reconcile()}
    assert by_name["ghost"].status == "dead"
    assert by_name["ghost"].error
    assert by_name["alive"].status == "running"


def _insert_many(db: str, worker: int) -> None:
    store = StateStore(Path(db))
    for i in range(25):
        store.insert(record(f"{worker:02x}{i:062x}", f"w{worker}-{i}"))
        store.update(f"{worker:02x}{i:062x}", status="running")


def test_concurrent_writers_never_lose_rows(tmp_path: Path) -> None:
    db = str(tmp_path / "state.db")
    StateStore(Path(db)).close()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_insert_many, args=(db, w)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = StateStore(Path(db)).all()
    assert len(rows) == 200
    assert {r.status for r in rows} == {"running"}


def test_an_older_database_gains_the_new_columns(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "state.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE vms (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, image TEXT NOT NULL, "
                 "image_id TEXT NOT NULL, command TEXT NOT NULL, created REAL NOT NULL, started REAL, "
                 "finished REAL, status TEXT NOT NULL, exit_code INTEGER, error TEXT, monitor_pid INTEGER, "
                 "monitor_start INTEGER, vmm_pid INTEGER, vmm_start INTEGER, "
                 "auto_remove INTEGER NOT NULL DEFAULT 0, backend TEXT NOT NULL DEFAULT '')")
    conn.execute("INSERT INTO vms (id, name, image, image_id, command, created, status) "
                 "VALUES ('a', 'old', 'hello', 'x', '[]', 0, 'exited')")
    conn.commit()
    conn.close()
    store = StateStore(db)
    assert store.find("old").restart_count == 0
    store.update("a", restart_count=2)
    assert StateStore(db).find("old").restart_count == 2
