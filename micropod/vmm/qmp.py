"""A minimal QMP client: one JSON command at a time over QEMU's control socket."""

from __future__ import annotations

import json
import socket
from typing import Any

from micropod.errors import VmmError

# A VMM that a guest took over may answer anything: a reply line longer than this ends the connection.
MAX_REPLY = 1 << 20


class QmpClient:
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._buf = b""
        try:
            self._sock.connect(path)
            self._read()  # greeting
            self.execute("qmp_capabilities")
        except OSError as exc:
            self._sock.close()
            raise VmmError(f"QMP {path}: {exc}") from exc

    def execute(self, command: str, *, pass_fd: int | None = None, **arguments: Any) -> Any:
        """Run one command; ``pass_fd`` goes along as SCM_RIGHTS, for commands such as ``getfd``."""
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        data = json.dumps(message).encode() + b"\n"
        if pass_fd is None:
            self._sock.sendall(data)
        else:
            socket.send_fds(self._sock, [data], [pass_fd])
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise VmmError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_REPLY:
                raise VmmError(f"QMP sent a reply over {MAX_REPLY} bytes")
            chunk = self._sock.recv(65536)
            if not chunk:
                raise VmmError("QMP connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        value = json.loads(line)
        if not isinstance(value, dict):
            raise VmmError(f"QMP sent {value!r}")
        return value

    def close(self) -> None:
        self._sock.close()
