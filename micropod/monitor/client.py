"""The CLI's side of a monitor connection: control requests and the attach stream."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from micropod import wire
from micropod.channel import FramedSocket, decode
from micropod.errors import AgentError, NotFoundError, TimeoutExpired
from micropod.monitor import api
from micropod.monitor.api import Op
from micropod.paths import StateRoot, VmDir
from micropod.unixsock import SocketDir

TYPE_CHECKING = False
if TYPE_CHECKING:
    from micropod.state import VmRecord


@dataclass(frozen=True)
class Outcome:
    """How a container ended, as its monitor reported it."""

    code: int
    error: str | None


class MonitorClient:
    def __init__(self, sock: socket.socket, container: str | None = None) -> None:
        self.channel = FramedSocket(sock)
        # A pod's container: its pod's monitor serves it, and every request names it.
        self.container = container
        self._backlog: list[tuple[int, int, bytes]] = []  # frames read past the message a caller waited for

    @classmethod
    def of(cls, root: StateRoot, record: VmRecord, timeout: float = 5.0) -> MonitorClient:
        """A connection to the monitor that runs ``record``'s container: its own, or its pod's."""
        if not record.pod:
            return cls.connect(root.vm(record.id), timeout)
        client = cls.connect(root.pod(record.pod), timeout)
        client.container = record.id
        return client

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
        if self.container is not None:
            fields.setdefault("container", self.container)
        self.channel.send_control(api.request(op, **fields))

    def follow(
        self,
        on_data: Callable[[int, bytes], None] | None = None,
        until: str | tuple[str, ...] = Op.EXIT,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Read frames, passing output to ``on_data``, until a control message ``until`` (one op, or any of
        several) or exit."""
        ends = {until, Op.EXIT} if isinstance(until, str) else {*until, Op.EXIT}
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while self._backlog:  # frames read past what an earlier call waited for come first
                kind, stream, payload = self._backlog.pop(0)
                if kind == wire.DATA and on_data is not None:
                    on_data(stream, payload)
                elif kind == wire.CONTROL:
                    message = decode(payload)
                    if message["op"] in ends:
                        return message
                    if message["op"] == Op.ERROR and self.container is not None:
                        # a pod's monitor refused what was asked about its container: that is the end of it
                        return api.exit_message(125, str(message.get("message")))
            if self.channel.closed:
                raise AgentError("the monitor went away without reporting an exit")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutExpired(f"timed out after {timeout:.0f}s waiting for the monitor")
            try:
                readable, _, _ = select.select([self.channel.sock], [], [], remaining)
            except InterruptedError:
                continue
            if readable:
                self._backlog.extend(self.channel.pump())

    def interact(
        self,
        on_data: Callable[[int, bytes], None],
        until: Iterable[str],
        stdin: int | None = None,
        wakeup: int | None = None,
        on_wakeup: Callable[[bytes], None] | None = None,
        detach_keys: bytes | None = None,
    ) -> dict[str, Any]:
        """Like follow, and also forward ``stdin`` (EOF included) as stream 0 until a control message in ``until``
        or ``exit``. Bytes read from ``wakeup`` (a signal wakeup fd) go to ``on_wakeup``. Typing ``detach_keys``
        returns a detached message (Op.DETACHED), as docker's Ctrl-P Ctrl-Q does."""
        ops = set(until) | {Op.EXIT}
        typed = b""
        while True:
            ended = self._deliver(on_data, ops)
            if ended is not None:
                self._backlog.pop(0)
                return ended
            watch = [self.channel.fileno()] + [fd for fd in (stdin, wakeup) if fd is not None]
            try:
                readable, _, _ = select.select(watch, [], [])
            except InterruptedError:
                continue
            if wakeup is not None and wakeup in readable:
                with contextlib.suppress(BlockingIOError):
                    data = os.read(wakeup, 512)
                    if on_wakeup is not None:
                        on_wakeup(data)
            if stdin is not None and stdin in readable:
                data = os.read(stdin, 1 << 16)
                if detach_keys:
                    typed = (typed + data)[-len(detach_keys):]
                    if typed == detach_keys:
                        return api.detached_message()
                if data:
                    self._send_reading(wire.encode(wire.DATA, wire.STDIN, data), on_data, ops)
                else:
                    self._send_reading(wire.encode(wire.EOF, wire.STDIN), on_data, ops)
                    stdin = None
            if self.channel.fileno() in readable:
                self._backlog.extend(self.channel.pump())
                if self.channel.closed and not self._backlog:
                    raise AgentError("the monitor went away without reporting an exit")

    def _deliver(self, on_data: Callable[[int, bytes], None], ops: set[str]) -> dict[str, Any] | None:
        """Hand the backlog's output to ``on_data`` in order, up to a control message in ``ops``: that one is
        returned, and left at the backlog's head."""
        while self._backlog:
            kind, stream, payload = self._backlog[0]
            if kind == wire.CONTROL and (message := decode(payload))["op"] in ops:
                return message
            self._backlog.pop(0)
            if kind == wire.DATA:
                on_data(stream, payload)
        return None

    def _send_reading(self, frame: bytes, on_data: Callable[[int, bytes], None], ops: set[str]) -> None:
        """Send ``frame`` while still reading the monitor's output: a monitor holds our input back while its
        guest does not read, so a client that only waited to write would stop the output that frees it."""
        sock, view = self.channel.sock, memoryview(frame)
        while view:
            try:
                readable, writable, _ = select.select([sock], [sock], [])
            except InterruptedError:
                continue
            if readable:
                self._backlog.extend(self.channel.pump())
                ended = self._deliver(on_data, ops)
                if ended is not None:
                    return  # the session is over: the rest of its input has nowhere to go
                if self.channel.closed:
                    raise AgentError("the monitor went away without reporting an exit")
            if writable:
                try:
                    view = view[sock.send(view, socket.MSG_DONTWAIT):]
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise AgentError(f"the monitor connection broke: {exc}") from exc

    def close(self) -> None:
        self.channel.close()


def outcome(message: dict[str, Any]) -> Outcome:
    return Outcome(int(message.get("code", 125)), message.get("error"))
