"""state.db's tables migrate one way (micropod/state/db.py), and the JSON records beside it are versioned
(micropod/state/records.py): old ones upgrade, newer ones are refused, and none vanishes silently."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from micropod.errors import StateError
from micropod.runconfig import ContainerSpec, RunConfig
from micropod.state import StateStore
from micropod.state.db import open_tables, table_version
from micropod.state.tables import ALL, ATTACHMENTS, VMS

# vms as the first release made it: no restart_count, no schema_versions.
FIRST_VMS = """CREATE TABLE vms (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, image TEXT NOT NULL,
    image_id TEXT NOT NULL, command TEXT NOT NULL, created REAL NOT NULL, started REAL, finished REAL,
    status TEXT NOT NULL, exit_code INTEGER, error TEXT, monitor_pid INTEGER, monitor_start INTEGER,
    vmm_pid INTEGER, vmm_start INTEGER, auto_remove INTEGER NOT NULL DEFAULT 0, backend TEXT NOT NULL DEFAULT '')"""


def columns(db: Path, table: str) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def test_a_database_from_before_versions_is_upgraded_and_keeps_its_rows(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with sqlite3.connect(db) as conn:
        conn.execute(FIRST_VMS)
        conn.execute("INSERT INTO vms (id, name, image, image_id, command, created, status) "
                     "VALUES ('a1', 'old', 'hello', 'x', '[\"true\"]', 1.0, 'exited')")
    store = StateStore(db)
    try:
        old = store.find("old")
        assert (old.id, old.status, old.restart_count, old.pod) == ("a1", "exited", 0, "")
    finally:
        store.close()
    assert columns(db, "vms")[-2:] == ["restart_count", "pod"]
    with sqlite3.connect(db) as conn:
        assert table_version(conn, "vms") == VMS.version == 3


def test_a_table_migrated_the_old_way_is_recorded_without_a_step_applied_twice(tmp_path: Path) -> None:
    """attachments gained its columns by ALTER TABLE on open before versions existed."""
    db = tmp_path / "state.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE attachments (vm_id TEXT PRIMARY KEY, tap TEXT NOT NULL, mac TEXT NOT NULL, "
                     "ip TEXT NOT NULL, ports TEXT NOT NULL, bridge TEXT NOT NULL DEFAULT '', "
                     "subnet TEXT NOT NULL DEFAULT '', icc INTEGER NOT NULL DEFAULT 1)")
    open_tables(db, ATTACHMENTS).close()
    # the old way's three columns are not added again; the step that came after versions is applied
    assert columns(db, "attachments") == ["vm_id", "tap", "mac", "ip", "ports", "bridge", "subnet", "icc", "rate",
                                             "metadata_port"]
    with sqlite3.connect(db) as conn:
        assert table_version(conn, "attachments") == 6


def test_a_table_newer_than_this_micropod_is_refused_with_one_clear_line(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    open_tables(db, VMS).close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE schema_versions SET version = 9 WHERE name = 'vms'")
    with pytest.raises(StateError, match="the vms table is at version 9, newer than this micropod knows \\(3\\)"):
        StateStore(db)


def _open_all(db: str) -> None:
    open_tables(Path(db), *ALL).close()


def test_concurrent_first_opens_migrate_once(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_open_all, args=(str(db),)) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    with sqlite3.connect(db) as conn:
        assert {name: version for name, version in conn.execute("SELECT name, version FROM schema_versions")} == {
            table.name: table.version for table in ALL}


def a_config(tmp_path: Path) -> tuple[RunConfig, Path]:
    cfg = RunConfig(vm_id="a" * 64, name="n", image="hello", image_id="b" * 64, backend="qemu",
                    kernel="/k", system="/s", rootfs="/r", vcpus=2, memory_mib=256,
                    container=ContainerSpec(args=("true",), env=()))
    path = tmp_path / "config.json"
    cfg.dump(path)
    return cfg, path


def test_config_records_carry_their_version_and_old_ones_load(tmp_path: Path) -> None:
    cfg, path = a_config(tmp_path)
    raw = json.loads(path.read_text())
    assert raw["schema"] == 8
    del raw["schema"]  # as micropod wrote them before records had versions
    for key in ("volumes", "binds", "tmpfs", "read_only"):  # nor had containers these yet
        del raw["container"][key]
    del raw["user_data"]  # nor configs this
    del raw["log"]["cri_path"]  # nor logs a CRI copy
    del raw["network"]["netns"], raw["network"]["gateway"]  # nor networks a CNI namespace
    for key in ("cpu_shares", "cpuset_cpus", "cpuset_mems"):  # nor a pod's containers these limits
        del raw["container"][key]
    path.write_text(json.dumps(raw))
    assert RunConfig.load(path) == cfg


def test_a_config_with_a_renamed_field_is_an_error_not_a_vanished_record(tmp_path: Path) -> None:
    """load_if_readable took this for a half-written file and returned None: the VM then looked config-less
    (and `system prune` would have taken its base image for unused)."""
    _, path = a_config(tmp_path)
    raw = json.loads(path.read_text())
    raw["rootfs_path"] = raw.pop("rootfs")
    path.write_text(json.dumps(raw))
    with pytest.raises(StateError, match=f"{path}: the VM's config.json does not fit this micropod: .*rootfs"):
        RunConfig.load_if_present(path)


@pytest.mark.parametrize(("content", "problem"), [
    ('{"schema": 9}', "is at version 9, newer than this micropod knows \\(8\\)"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a JSON object"),
    ('{"schema": "1"}', "has a bad 'schema'"),
])
def test_configs_that_cannot_be_understood_say_so(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(StateError, match=problem):
        RunConfig.load_if_present(path)


def test_only_a_missing_config_is_absent(tmp_path: Path) -> None:
    assert RunConfig.load_if_present(tmp_path / "gone" / "config.json") is None
    with pytest.raises(StateError, match="is gone"):
        RunConfig.load(tmp_path / "config.json")
