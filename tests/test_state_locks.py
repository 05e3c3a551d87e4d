"""A long-lived process (the CRI server) opens stores again and again while other connections of its own are
open; none of that may cost it SQLite's POSIX locks, or another process's last connection takes the WAL for
unused and deletes it from under it (writes lost, "file is not a database")."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from micropod.fsutil import make_private
from micropod.state import StateStore
from micropod.state.pods import PodStore


def test_opening_a_store_keeps_the_process_s_locks(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    StateStore(db).close()
    held = PodStore(db)  # a connection of this process, in WAL mode, holding its shared lock
    try:
        held.all()
        again = StateStore(db)  # another store opened meanwhile, as each CRI call does
        # another process's last connection: it checkpoints and deletes the WAL only if it holds the only lock
        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                        "from micropod.state.pods import PodStore; PodStore(Path(sys.argv[1])).close()", str(db)],
                       check=True, timeout=60)
        assert (tmp_path / "state.db-wal").exists() and (tmp_path / "state.db-shm").exists()
        held.all()
        again.close()
    finally:
        held.close()


def test_make_private_creates_fixes_and_never_follows(tmp_path: Path) -> None:
    made = tmp_path / "made"
    make_private(made)
    assert stat.S_IMODE(made.stat().st_mode) == 0o600
    made.chmod(0o644)
    make_private(made)
    assert stat.S_IMODE(made.stat().st_mode) == 0o600
    target = tmp_path / "elsewhere"
    target.write_text("")
    target.chmod(0o644)
    os.symlink(target, tmp_path / "planted")
    with pytest.raises(OSError):
        make_private(tmp_path / "planted")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


@pytest.mark.parametrize("store", [PodStore, StateStore])
def test_whichever_store_makes_state_db_makes_it_private(tmp_path: Path, store: type) -> None:
    """Only StateStore made it 0600 before: a pod or volume store that came first left the umask's mode."""
    db = tmp_path / "state.db"
    old = os.umask(0)
    try:
        opened = store(db)
        opened.all()
        opened.close()
    finally:
        os.umask(old)
    for path in (db, db.with_name("state.db-wal"), db.with_name("state.db-shm")):
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
