"""Each container's /dev/log: a datagram socket whose messages go to the host (op ``syslog``)."""

from __future__ import annotations

import _socket
import os
import select

from micropod.wire import GuestOp

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol

    from micropod.agent.containers import Container

    class SyslogOwner(Protocol):
        """What syslog needs of the agent (micropod/agent/main.py), which imports this module."""

        def watch(self, fd: int, events: int) -> None: ...
        def log(self, message: str) -> None: ...
        def send_control(self, message: dict[str, Any]) -> None: ...

_MAX_DATAGRAM = 1 << 16
_BATCH = 64  # datagrams per wakeup; the rest waits for the next one


class Syslog:
    def __init__(self, agent: SyslogOwner) -> None:
        self.agent = agent
        self.sockets: dict[int, tuple[Container, _socket.socket]] = {}

    def serve(self, container: Container) -> None:
        path = f"{container.root}/dev/log"
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
        try:
            if os.path.lexists(path):
                os.unlink(path)
            sock.bind(path)
            os.chmod(path, 0o666)
        except OSError as exc:
            sock.close()
            self.agent.log(f"cannot serve /dev/log in container {container.cid}: {exc}")
            return
        sock.setblocking(False)
        self.sockets[sock.fileno()] = (container, sock)
        self.agent.watch(sock.fileno(), select.EPOLLIN)

    def forward(self, fd: int) -> None:
        container, sock = self.sockets[fd]
        for _ in range(_BATCH):
            try:
                data = sock.recv(_MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as exc:
                self.agent.log(f"reading /dev/log of container {container.cid}: {exc}")
                return
            message = data.decode(errors="replace")
            self.agent.send_control({"op": GuestOp.SYSLOG, "id": container.cid, "message": message})

    def forward_all(self) -> None:
        for fd in self.sockets:
            self.forward(fd)

    def stop_serving(self, container: Container) -> None:
        """A removed container's /dev/log: what it logged goes out, then its socket closes."""
        for fd, (owner, sock) in list(self.sockets.items()):
            if owner is container:
                self.forward(fd)
                self.agent.watch(fd, 0)
                sock.close()
                del self.sockets[fd]

    def close(self) -> None:
        for fd, (_, sock) in list(self.sockets.items()):
            self.forward(fd)  # what was logged before the end still goes out
            self.agent.watch(fd, 0)
            sock.close()
        self.sockets.clear()
