"""Atomic files and advisory locks: the two things that keep concurrent micropod processes safe."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(dest: Path, *, tmp_dir: Path | None = None, mode: int | None = 0o644) -> Iterator[BinaryIO]:
    """A file to write that becomes `dest` only when the block ends without an error, so readers see
    the old or the new content, never a mix, even after a crash. ``mode`` None keeps mkstemp's 0600."""
    directory = tmp_dir or dest.parent
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(dest.parent)


PRIVATE_DIR = 0o700
COPY_CHUNK = 1 << 24
PRIVATE_FILE = 0o600


def private_dir(path: Path) -> Path:
    """A directory only its owner can enter, whatever the umask (mkdir's mode is masked by it) and whoever
    created it first: an older state root made 0755 is closed on first use."""
    if not path.parent.exists():
        private_dir(path.parent)  # mkdir(parents=True) would give the parents the umask's mode
    path.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    os.chmod(path, PRIVATE_DIR)
    return path


def private_file(path: Path, flags: int = os.O_WRONLY | os.O_APPEND) -> int:
    """Open (creating) a file as 0600 whatever the umask, without following a link planted in its place."""
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)
    return fd


def make_private(path: Path) -> None:
    """``path`` a regular file of mode 0600, created if missing, touched without a descriptor that could hold
    locks: closing any other descriptor of a file drops every POSIX lock this process has on it, and SQLite's
    connections elsewhere in a long-lived process (the CRI server) rely on theirs to keep the WAL alive."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE))
        return  # new: nobody had it open
    except FileExistsError:
        pass
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)  # closing an O_PATH descriptor drops no lock
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        if stat.S_IMODE(info.st_mode) != PRIVATE_FILE:
            os.chmod(f"/proc/self/fd/{fd}", PRIVATE_FILE)
    finally:
        os.close(fd)


def atomic_write(dest: Path, data: bytes, *, tmp_dir: Path | None = None, mode: int = 0o644) -> None:
    """Write `dest` so readers see the old or the new content, never a mix, even after a crash."""
    with atomic_file(dest, tmp_dir=tmp_dir, mode=mode) as f:
        f.write(data)


@contextlib.contextmanager
def flock(path: Path, *, exclusive: bool = True) -> Iterator[None]:
    """Hold an advisory lock on `path` (created if missing) for the duration of the block.

    flock locks belong to the open file, so two handles in one process exclude each other too.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def copy_sparse(src: int, dst: int, size: int) -> None:
    """Bytes [0, size) of ``src`` into ``dst``, holes left holes."""
    os.ftruncate(dst, size)
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        os.lseek(dst, start, os.SEEK_SET)
        while start < end:
            sent = os.sendfile(dst, src, start, min(end - start, COPY_CHUNK))
            if sent == 0:
                raise OSError(errno.EIO, "the source ended before its size")
            start += sent
        offset = end
