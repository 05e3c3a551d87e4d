"""A VMM's console and its own output, through a pipe, into a log that cannot grow without bound.

The serial console is the guest's to write, and so, through device warnings, is much of what the VMM prints:
a file the VMM appends to itself would let a guest fill the host's disk. So the VMM writes into a pipe, and a
thread of ours copies the bytes into ``path``, renaming it to ``path.1`` (one backup) whenever the next write
would pass ``max_bytes``. If we fall behind, the pipe fills and the guest's console stalls: never a buffer of
ours that grows.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from micropod.fsutil import private_file

CONSOLE_LOG_MAX = 4 << 20
VMM_LOG_MAX = 1 << 20
METRICS_LOG_MAX = 1 << 20
_READ = 1 << 16


def backup(path: Path) -> Path:
    return path.with_name(path.name + ".1")


class CappedLog:
    """``write_fd`` goes to the child (then ``child_started``); the thread ends at the pipe's EOF.

    With ``fifo``, the pipe is a named one at that path, for a VMM that opens its log by name (Firecracker's
    logger and metrics): ``write_fd`` is then our own writer, held until the VMM has opened the fifo, so that
    the copy does not see an EOF before the VMM's first write."""

    def __init__(self, path: Path, max_bytes: int, fifo: Path | None = None, deferred: bool = False) -> None:
        self.path = path
        self.max_bytes = max_bytes
        if fifo is None:
            self._read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        else:
            fifo.unlink(missing_ok=True)
            os.mkfifo(fifo, 0o600)
            self._read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
            self.write_fd = os.open(fifo, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            os.set_blocking(self._read_fd, True)
        self._out = private_file(path)
        self._size = os.fstat(self._out).st_size
        self._thread = threading.Thread(target=self._copy, name=f"log {path.name}", daemon=True)
        # ``deferred``: the copy starts with child_started, so that the fork runs in a process with no thread of
        # ours (a confined QEMU's jail is set up between fork and exec); the pipe holds what comes meanwhile.
        if not deferred:
            self._thread.start()

    def child_started(self) -> None:
        """Close our copy of the write end, so that the child's exit is the pipe's EOF."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1
        if not self._thread.is_alive() and self._thread.ident is None:
            self._thread.start()

    def settle(self, timeout: float = 2.0) -> None:
        """Wait (bounded) until what the child wrote is in the file: before reading its tail after the exit."""
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def _copy(self) -> None:
        try:
            while data := os.read(self._read_fd, _READ):
                self._append(data)
        except OSError:
            pass  # a full disk or a vanished directory: stop copying, and the child then blocks on a full pipe
        finally:
            os.close(self._read_fd)
            os.close(self._out)

    def _append(self, data: bytes) -> None:
        if self._size and self._size + len(data) > self.max_bytes:
            os.replace(self.path, backup(self.path))
            os.close(self._out)
            self._out = private_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_TRUNC)
            self._size = 0
        view = memoryview(data)[: self.max_bytes]  # one read is 64 KiB; a cap below that still holds
        while view:
            written = os.write(self._out, view)
            self._size += written
            view = view[written:]


def close_all(*logs: CappedLog | None) -> None:
    """For a child that was never started: close the write ends so that the threads end."""
    for log in logs:
        if log is not None:
            with contextlib.suppress(OSError):
                log.child_started()
