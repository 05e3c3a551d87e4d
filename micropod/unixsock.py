"""Unix sockets at paths of any length.

sun_path holds 107 bytes, and state roots (pytest's temporary directories, say) go deeper than that.
A socket whose path is too long is reached through /proc/self/fd/N/NAME, N being an O_PATH handle on
its directory; VMMs are started with that directory as their working directory and given bare names.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

MAX_SUN_PATH = 107


class SocketDir:
    """A directory whose sockets micropod binds or connects to, however long its path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def address(self, name: str) -> str:
        full = self.path / name
        if len(os.fsencode(full)) <= MAX_SUN_PATH:
            return str(full)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self._fd}/{name}"

    def listen(self, name: str, backlog: int = 16) -> socket.socket:
        (self.path / name).unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.address(name))
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock

    def connect(self, name: str, timeout: float | None = None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(self.address(name))
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
