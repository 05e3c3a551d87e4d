"""The per-VM writable layer: sparse, small on disk, quick to make, a clean ext4."""

from __future__ import annotations

import time

import pytest

from micropod import proc
from micropod.errors import RootfsError
from micropod.rootfs.upper import DEFAULT_UPPER_SIZE, UPPER_LABEL, create_upper


def test_sparse_ext4_of_the_requested_size(tmp_path):
    path = tmp_path / "upper.ext4"
    start = time.monotonic()
    create_upper(path)
    elapsed = time.monotonic() - start
    assert path.stat().st_size == DEFAULT_UPPER_SIZE
    assert path.stat().st_blocks * 512 < 64 * 1024**2  # sparse: a few MB of metadata only
    assert elapsed < 5
    header = proc.run(["dumpe2fs", "-h", path]).stdout.decode()
    assert UPPER_LABEL in header and "has_journal" in header
    assert "Reserved block count:     0" in header
    groups = proc.run(["dumpe2fs", path]).stdout.decode()
    assert "ITABLE_ZEROED" in groups  # so the guest runs no lazy inode-table init
    proc.run(["e2fsck", "-n", "-f", path])


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "upper.ext4"
    path.write_bytes(b"precious")
    with pytest.raises(RootfsError):
        create_upper(path, 64 * 1024**2)
    assert path.read_bytes() == b"precious"


def test_too_small(tmp_path):
    with pytest.raises(RootfsError, match="minimum"):
        create_upper(tmp_path / "u", 1024)
    assert not (tmp_path / "u").exists()
