"""The per-VM writable layer: a sparse ext4 file the guest mounts as the overlay's upper directory.

It costs next to nothing on disk until the container writes, so the default size is generous: docker
has no limit, and 10 GiB bounds a runaway container without getting in a normal one's way.

mkfs options, and why:
- `lazy_itable_init=0`: mke2fs "zeroes" the inode tables itself. On a file that is a hole punch, so it
  is instant and keeps the file sparse, and the guest kernel then has no ext4lazyinit thread writing
  ~160 MB of zeros per 10 GiB into the file behind the container's back.
- `lazy_journal_init=1`: the journal of a brand-new sparse file already reads as zeros.
- the journal stays: a container can be stopped hard and started again, and its upper must survive.
- `-m 0`: no blocks reserved for root; the container's root would get them anyway.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from micropod import proc
from micropod.errors import CommandError, RootfsError
from micropod.fsutil import private_file

DEFAULT_UPPER_SIZE = 10 * 1024**3
MIN_UPPER_SIZE = 16 * 1024**2
UPPER_LABEL = "micropod-upper"


def mkfs_argv(path: Path) -> list[str | Path]:
    return [
        "mkfs.ext4", "-q", "-F",
        "-L", UPPER_LABEL,
        "-m", "0",
        "-E", "lazy_itable_init=0,lazy_journal_init=1,root_owner=0:0",
        path,
    ]


def create_upper(path: Path, size_bytes: int = DEFAULT_UPPER_SIZE) -> None:
    """Create a sparse ext4 of `size_bytes` at `path` (which must not exist)."""
    if size_bytes < MIN_UPPER_SIZE:
        raise RootfsError(f"upper layer size {size_bytes} is below the minimum of {MIN_UPPER_SIZE} bytes")
    try:
        with os.fdopen(private_file(path, os.O_WRONLY | os.O_EXCL), "wb") as f:
            f.truncate(size_bytes)
    except OSError as exc:
        raise RootfsError(f"cannot create {path}: {exc}") from exc
    try:
        proc.run(mkfs_argv(path), timeout=120)
    except CommandError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise RootfsError(f"cannot make the writable layer {path}: {exc}") from exc
