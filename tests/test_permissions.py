"""Nothing micropod keeps under its state root is open to other local users, whatever the caller's umask."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from micropod.fsutil import private_dir, private_file
from micropod.paths import CacheRoot, StateRoot
from micropod.rootfs.upper import create_upper
from micropod.state import StateStore
from micropod.vmm.snapshot import snapshot_dir
from tests.conftest import Cli


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def open_to_others(root: Path) -> list[str]:
    """Every path beneath root (root included) that a group or another user could read, write or enter."""
    found = []
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
            found.append(f"{path.relative_to(root.parent)} {stat.filemode(st.st_mode)}")
    return found


def test_a_state_root_is_private_under_umask_000(tmp_path: Path) -> None:
    with umask(0):
        root = StateRoot(tmp_path / "root").ensure()
        StateStore(root.db).close()
    assert open_to_others(root.path) == []


def test_an_older_open_state_root_is_closed_on_first_use(tmp_path: Path) -> None:
    (tmp_path / "root" / "vms").mkdir(parents=True, mode=0o755)
    os.chmod(tmp_path / "root", 0o755)
    StateRoot(tmp_path / "root").ensure()
    assert stat.S_IMODE((tmp_path / "root").stat().st_mode) == 0o700


def test_private_files_and_dirs_ignore_the_umask_and_links(tmp_path: Path) -> None:
    with umask(0):
        assert stat.S_IMODE(private_dir(tmp_path / "d").stat().st_mode) == 0o700
        os.close(private_file(tmp_path / "d" / "log"))
        (tmp_path / "d" / "planted").symlink_to(tmp_path / "elsewhere")
        with pytest.raises(OSError):
            private_file(tmp_path / "d" / "planted")
    assert stat.S_IMODE((tmp_path / "d" / "log").stat().st_mode) == 0o600
    assert not (tmp_path / "elsewhere").exists()


def test_the_writable_layer_is_private(tmp_path: Path) -> None:
    with umask(0):
        create_upper(tmp_path / "upper.ext4", 64 << 20)
    assert stat.S_IMODE((tmp_path / "upper.ext4").stat().st_mode) == 0o600


@pytest.mark.e2e
def test_a_running_containers_files_and_sockets_are_private_under_umask_000(cli: Cli) -> None:
    with umask(0):
        started = cli("run", "-d", "--name", "secret", "-e", "TOKEN=s3cr3t", "hello", "sleep", "600")
    assert started.returncode == 0, started.stderr
    try:
        vm_dir = next((cli.root / "vms").iterdir())
        names = {p.name for p in vm_dir.iterdir()}
        assert {"config.json", "monitor.log", "monitor.sock"} <= names, names
        assert open_to_others(cli.root) == []
        snapshots = snapshot_dir(CacheRoot.from_env())
        if snapshots.exists():  # absent with MICROPOD_SNAPSHOTS=0
            assert open_to_others(snapshots) == []
    finally:
        cli("rm", "-f", "secret", timeout=120)
