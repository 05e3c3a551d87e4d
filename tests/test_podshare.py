"""A pod's shared directory on the host (root, no VM): a tmpfs of its own, read-only binds that are never
writable, and removal that what the guest left in it cannot stop."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from micropod.errors import StateError
from micropod.service import podshare

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def test_a_share_is_a_small_tmpfs_and_read_only_binds_are_read_only_from_the_start(tmp_path: Path) -> None:
    share, source = tmp_path / "shared", tmp_path / "host"
    share.mkdir()
    source.mkdir()
    (source / "file").write_text("host\n")
    podshare.mount_share(share)
    podshare.mount_share(share)  # idempotent
    try:
        assert os.path.ismount(share) and os.statvfs(share).f_blocks * os.statvfs(share).f_frsize <= 1 << 20
        name = podshare.entry_name("c" * 64, 0)
        podshare.bind(share, name, source, read_only=True)
        with pytest.raises(OSError, match="Read-only"):
            (share / name / "new").write_text("x")
        assert (share / name / "file").read_text() == "host\n"
        # the guest fills an entry's mount point under another of the container's names, and junk beside it
        (share / podshare.entry_name("c" * 64, 1) / "deep").mkdir(parents=True)
        (share / "junk").mkdir()
        podshare.unbind_container(share, "c" * 64, 2)  # neither stops it, nor is followed
        assert not os.path.ismount(share / name) and (source / "file").read_text() == "host\n"
        podshare.unbind_all(share)
    finally:
        podshare.unmount_share(share)
    assert not os.path.ismount(share) and not any(share.iterdir())  # the guest's leavings went with the tmpfs


def test_a_share_with_a_host_path_still_bound_is_not_unmounted(tmp_path: Path) -> None:
    share, source = tmp_path / "shared", tmp_path / "host"
    share.mkdir()
    source.mkdir()
    podshare.mount_share(share)
    podshare.bind(share, "x-0", source, read_only=False)
    try:
        with pytest.raises(StateError, match="cannot unmount"):
            podshare.unmount_share(share)  # never lazily: a recursive removal would reach the host path
    finally:
        podshare.unbind_all(share)
        podshare.unmount_share(share)
