"""A uid's read access to one file through its POSIX ACL (micropod/vmm/acl.py), checked by the kernel."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from micropod.vmm import acl

UID = 3999000


def readable_by(path: Path, uid: int) -> bool:
    done = subprocess.run(["cat", str(path)], user=uid, group=uid, extra_groups=[], capture_output=True)
    return done.returncode == 0


def test_a_uid_reads_a_root_only_file_while_granted_and_the_mode_comes_back() -> None:
    top = Path(tempfile.mkdtemp(prefix="micropod-acl-", dir="/tmp"))  # pytest's own tmp_path is root's alone
    top.chmod(0o755)
    try:
        check(top / "base.sqfs")
    finally:
        shutil.rmtree(top)


def check(disk: Path) -> None:
    disk.write_text("image base\n")
    disk.chmod(0o600)
    assert not readable_by(disk, UID)
    acl.grant_read(disk, UID)
    acl.grant_read(disk, UID + 1)
    assert readable_by(disk, UID) and readable_by(disk, UID + 1) and not readable_by(disk, UID + 2)
    acl.revoke(disk, UID)
    assert not readable_by(disk, UID) and readable_by(disk, UID + 1)
    acl.revoke(disk, UID + 1)
    acl.revoke(disk, UID + 1)  # again: nothing to do
    assert not readable_by(disk, UID + 1)
    assert disk.stat().st_mode & 0o777 == 0o600
    assert "system.posix_acl_access" not in os.listxattr(disk)
