"""A monitor's clients: CLI connections on its control socket (and `run`'s inherited one), and the selector they,
the agent channel and the VMM are watched with.

Every client socket is non-blocking with a bounded queue (channel.FramedSocket). A client that is *held*
(attached to the main process, or the client of an exec or cp session) is never dropped for being slow: once
its queue passes HIGH_WATER the monitor stops reading the agent channel until it drains, so the guest's
writes block instead, as docker's attach and blocking log mode block the container. One slow held client
thus stalls the whole VM's output (its channel is one stream); `stop` and `kill` still work, since they
act on the VMM. Other clients (wait, stats, start) only hear control messages; one that lets its queue
reach the bound is dropped with a line in monitor.log.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
from collections.abc import Callable, Collection
from typing import Any, Protocol

from micropod.channel import FramedSocket
from micropod.errors import ChannelFull, MicropodError
from micropod.paths import VmDir
from micropod.unixsock import SocketDir

log = logging.getLogger("micropod.monitor")

Watched = socket.socket | int
HIGH_WATER = 1 << 20  # a held client's queue past this pauses the agent channel
FLUSH_STALL = 10.0  # at the end, a client that takes nothing for this long gets no more

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class Watchlist:
    """The monitor's selector. Renewed rather than emptied, so that nothing of an ended boot stays watched."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._what: dict[int, tuple[Watched, object]] = {}  # also what is watched for no event right now

    def renew(self) -> None:
        self._sel.close()
        self._sel = selectors.DefaultSelector()
        self._what.clear()

    def watch(self, fileobj: Watched, what: object, events: int = READ) -> None:
        """Watch ``fileobj`` for ``events`` (0 pauses it: it stays known, and set_events() resumes it)."""
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        self._what[fd] = (fileobj, what)
        self.set_events(fileobj, events)

    def set_events(self, fileobj: Watched, events: int) -> None:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if fd not in self._what:
            return
        what = self._what[fd][1]
        try:
            key = self._sel.get_key(fileobj)
        except KeyError:
            if events:
                self._sel.register(fileobj, events, what)
            return
        if not events:
            self._sel.unregister(fileobj)
        elif key.events != events:
            self._sel.modify(fileobj, events, what)

    def events(self, fileobj: Watched) -> int:
        try:
            return self._sel.get_key(fileobj).events
        except (KeyError, ValueError):
            return 0

    def watched(self, fileobj: Watched) -> bool:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return fd in self._what

    def forget(self, fileobj: Watched) -> None:
        with contextlib.suppress(KeyError, ValueError):
            fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
            self._what.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(fileobj)

    def ready(self, timeout: float | None) -> list[tuple[object, int]]:
        """What each ready source was watched as, and whether it is readable, writable or both."""
        return [(key.data, mask) for key, mask in self._sel.select(timeout)]


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
        """The end of a boot: what is queued still goes out, as far as each client takes it, then all go."""
        self.flush_all()
        for fd in list(self.clients):
            self.drop(fd)

    def send_to(self, fd: int | None, send: Callable[[FramedSocket], None]) -> None:
        """Queue for one client, if it is still there; one that has gone, or lets its queue fill, is dropped."""
        client = self.clients.get(fd) if fd is not None else None
        if client is None:
            return
        try:
            send(client)
        except ChannelFull:
            log.warning("dropping client %d: it reads nothing and %d bytes wait for it", fd, client.backlog)
            self.drop(client.fileno())
        except MicropodError:
            self.drop(client.fileno())

    def to_attached(self, send: Callable[[FramedSocket], None]) -> None:
        for fd in list(self.attached):
            self.send_to(fd, send)

    def broadcast(self, message: dict[str, Any], only_attached: bool = True) -> None:
        for fd in list(self.attached if only_attached else self.clients):
            self.send_to(fd, lambda c: c.send_control(message))

    def flush(self, fd: int) -> None:
        """The client is writable: send more of its queue."""
        client = self.clients.get(fd)
        if client is None:
            return
        try:
            client.flush()
        except MicropodError:
            self.drop(fd)

    def holding_back(self, held: Collection[int]) -> bool:
        """Some held client has more queued than HIGH_WATER: the agent channel must wait."""
        return any(fd in self.clients and self.clients[fd].backlog >= HIGH_WATER for fd in held)

    def flush_all(self) -> None:
        """Send every queue out, waiting while clients take it; one that takes nothing for FLUSH_STALL is left."""
        sel = selectors.DefaultSelector()
        try:
            pending = {fd: c for fd, c in self.clients.items() if c.backlog and not c.closed}
            for client in pending.values():
                sel.register(client.sock, WRITE)
            while pending:
                ready = sel.select(FLUSH_STALL)
                if not ready:
                    log.warning("%d clients took nothing for %.0fs; their output is lost", len(pending), FLUSH_STALL)
                    return
                for key, _ in ready:
                    client = pending[key.fd]
                    with contextlib.suppress(MicropodError):
                        client.flush()
                    if not client.backlog or client.closed:
                        sel.unregister(client.sock)
                        del pending[key.fd]
        finally:
            sel.close()


def wake_on_signals(wake: socket.socket) -> None:
    """SIGTERM, SIGINT and SIGHUP write to ``wake`` (the monitor's loop watches its other end) instead of
    interrupting whatever the monitor is doing."""
    import signal

    wake.setblocking(False)
    signal.set_wakeup_fd(wake.fileno())
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: None)
