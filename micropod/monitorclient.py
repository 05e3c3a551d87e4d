"""The CLI's side of a monitor connection: control requests and the attach stream."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from micropod.agent import protocol
from micropod.channel import FramedSocket, decode
from micropod.errors import AgentError, NotFoundError, TimeoutExpired
from micropod.paths import VmDir
from micropod.unixsock import SocketDir


@dataclass(frozen=True)
class Outcome:
    """How a container ended, as its monitor reported it."""

    code: int
    error: str | None


class MonitorClient:
    def __init__(self, sock: socket.socket) -> None:
        self.channel = FramedSocket(sock)

    @classmethod
    def connect(cls, vm_dir: VmDir, timeout: float = 5.0) -> MonitorClient:
        sockets = SocketDir(vm_dir.path)
        try:
            sock = sockets.connect(vm_dir.monitor_sock.name, timeout)
        except OSError as exc:
            raise NotFoundError(f"the VM's monitor is not reachable ({exc.strerror})") from exc
        finally:
            sockets.close()
        sock.settimeout(None)
        return cls(sock)

    def request(self, op: str, **fields: Any) -> None:
        self.channel.send_control({"op": op, **fields})

    def follow(
        self,
        on_data: Callable[[int, bytes], None] | None = None,
        until: str = "exit",
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Read frames, passing output to ``on_data``, until a control message ``until`` or exit."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutExpired(f"timed out after {timeout:.0f}s waiting for the monitor")
            try:
                readable, _, _ = select.select([self.channel.sock], [], [], remaining)
            except InterruptedError:
                continue
            if not readable:
                continue
            for kind, stream, payload in self.channel.pump():
                if kind == protocol.DATA and on_data is not None:
                    on_data(stream, payload)
                elif kind == protocol.CONTROL:
                    message = decode(payload)
                    if message["op"] in (until, "exit"):
                        return message
            if self.channel.closed:
                raise AgentError("the monitor went away without reporting an exit")

    def close(self) -> None:
        self.channel.close()


def outcome(message: dict[str, Any]) -> Outcome:
    return Outcome(int(message.get("code", 125)), message.get("error"))
