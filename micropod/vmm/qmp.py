"""A minimal QMP client: one JSON command at a time over QEMU's control socket."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from micropod.errors import VmmError

# A VMM that a guest took over may answer anything: a reply line longer than this ends the connection.
MAX_REPLY = 1 << 20
MAX_EVENTS = 1000
ANSWER_WAIT = 30.0


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
        # Events may come before the answer (a guest can cause many): at most this many, within the timeout.
        deadline = time.monotonic() + ANSWER_WAIT
        for _ in range(MAX_EVENTS):
            if time.monotonic() > deadline:
                break
            reply = self._read()
            if "event" in reply:
                continue
            error = reply.get("error")
            if error is not None:
                desc = error.get("desc") if isinstance(error, dict) else None
                raise VmmError(f"QMP {command}: {str(desc if desc is not None else error)[:500]}")
            return reply.get("return")
        raise VmmError(f"QMP {command}: no answer within {ANSWER_WAIT:.0f}s or {MAX_EVENTS} events")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_REPLY:
                raise VmmError(f"QMP sent a reply over {MAX_REPLY} bytes")
            try:
                chunk = self._sock.recv(65536)
            except OSError as exc:  # the timeout included
                raise VmmError(f"QMP: {exc}") from exc
            if not chunk:
                raise VmmError("QMP connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise VmmError(f"QMP sent something that is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise VmmError(f"QMP sent {type(value).__name__}, not an object")
        return value

    def close(self) -> None:
        self._sock.close()
