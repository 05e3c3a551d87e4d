"""A monitor's clients: CLI connections on its control socket (and `run`'s inherited one), and the selector they,
the agent channel and the VMM are watched with."""

from __future__ import annotations

import contextlib
import selectors
import socket
from collections.abc import Callable
from typing import Any, Protocol

from micropod.channel import FramedSocket
from micropod.errors import MicropodError
from micropod.paths import VmDir
from micropod.unixsock import SocketDir

Watched = socket.socket | int


class Watchlist:
    """The monitor's selector. Renewed rather than emptied, so that nothing of an ended boot stays watched."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()

    def renew(self) -> None:
        self._sel.close()
        self._sel = selectors.DefaultSelector()

    def watch(self, fileobj: Watched, what: object) -> None:
        self._sel.register(fileobj, selectors.EVENT_READ, what)

    def forget(self, fileobj: Watched) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(fileobj)

    def ready(self, timeout: float | None) -> list[object]:
        """What each readable source was watched as."""
        return [key.data for key, _ in self._sel.select(timeout)]


class ClientEvents(Protocol):
    def client_gone(self, fd: int) -> None:
        """A client went away (or was dropped): whatever it ran hangs up."""

    def last_client_gone(self) -> None:
        """Nobody is connected any more."""


class Connections:
    """Clients by file descriptor; attached ones see the main process's output and may feed its stdin."""

    def __init__(self, vm_dir: VmDir, watch: Watchlist, events: ClientEvents) -> None:
        self.vm_dir = vm_dir
        self.watch = watch
        self.events = events
        self.clients: dict[int, FramedSocket] = {}
        self.attached: set[int] = set()
        self.listener: socket.socket | None = None

    def listen(self) -> None:
        """Watch the control socket (bound once, on first use) for new clients."""
        if self.listener is None:
            self.listener = SocketDir(self.vm_dir.path).listen(self.vm_dir.monitor_sock.name)
        self.watch.watch(self.listener, "listener")

    def accept(self) -> None:
        assert self.listener is not None
        conn, _ = self.listener.accept()
        self.add(conn, attached=False)

    def add(self, sock: socket.socket, attached: bool) -> None:
        sock.setblocking(False)
        client = FramedSocket(sock)
        self.clients[sock.fileno()] = client
        if attached:
            self.attached.add(sock.fileno())
        self.watch.watch(sock, sock.fileno())

    def drop(self, fd: int) -> None:
        client = self.clients.pop(fd, None)
        self.attached.discard(fd)
        self.events.client_gone(fd)
        if client is not None:
            self.watch.forget(client.sock)
            client.close()
            if not self.clients:
                self.events.last_client_gone()

    def drop_all(self) -> None:
        for fd in list(self.clients):
            self.drop(fd)

    def send_to(self, fd: int | None, send: Callable[[FramedSocket], None]) -> None:
        """Send to one client, if it is still there; one that cannot take it is dropped."""
        client = self.clients.get(fd) if fd is not None else None
        if client is None:
            return
        try:
            send(client)
        except MicropodError:
            self.drop(client.fileno())

    def to_attached(self, send: Callable[[FramedSocket], None]) -> None:
        self._send_each(self.attached, send)

    def broadcast(self, message: dict[str, Any], only_attached: bool = True) -> None:
        self._send_each(self.attached if only_attached else set(self.clients), lambda c: c.send_control(message))

    def _send_each(self, fds: set[int], send: Callable[[FramedSocket], None]) -> None:
        for fd in list(fds):
            try:
                send(self.clients[fd])
            except (MicropodError, KeyError):
                self.drop(fd)
