"""The socket between the runtime and the processes it forks: one JSON object per line, both ways.

The child reports progress and asks for what only the runtime can do (uid maps, hooks in the runtime's
namespaces); the runtime answers ``{"ok": true}``. An ``error`` from the child ends the operation with its text.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from micropod.errors import OciRuntimeError, ProgramError

MAX_LINE = 1 << 16
# The runtime never waits longer for a child: one stopped by the container (SIGSTOP during an exec) must not
# hang the caller, which in the guest is the agent.
SYNC_TIMEOUT = 60.0


class SyncSocket:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""

    @classmethod
    def pair(cls) -> tuple[SyncSocket, SyncSocket]:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent.settimeout(SYNC_TIMEOUT)
        return cls(parent), cls(child)

    def send(self, **message: Any) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def recv(self) -> dict[str, Any] | None:
        """The next message; None once the other side has gone without a word."""
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE:
                raise OciRuntimeError("the container's init sent an oversized message")
            try:
                data = self.sock.recv(MAX_LINE)
            except TimeoutError:
                raise OciRuntimeError(f"the container's init did not answer within {SYNC_TIMEOUT:.0f}s") from None
            if not data:
                return None
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise OciRuntimeError("the container's init sent a malformed message")
        return message

    def expect(self, what: str) -> dict[str, Any]:
        """The next message, which must carry ``what``; an ``error`` from the other side is raised as ours."""
        message = self.recv()
        if message is None:
            raise OciRuntimeError(f"the container's init exited before {what}")
        if "error" in message:
            raise_reported(message)
        if what not in message:
            raise OciRuntimeError(f"the container's init sent {sorted(message)} instead of {what}")
        return message

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def raise_reported(message: dict[str, Any]) -> None:
    """The child's ``error`` as our exception, keeping docker's exit code for a program that cannot run."""
    code = message.get("code")
    if isinstance(code, int) and code in (126, 127):
        raise ProgramError(str(message["error"]), code)
    raise OciRuntimeError(str(message["error"]))


def fail_child(sync: SyncSocket, message: str, code: int = 125) -> None:
    """In a forked child: report and leave at once (no atexit, no flushing of the parent's buffers)."""
    try:
        sync.send(error=message, code=code)
    finally:
        os._exit(1)
