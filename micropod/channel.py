"""A framed stream socket (agent channel or monitor control connection), host side.

A blocking socket (the CLI's side) sends each frame in full. A non-blocking one (every socket of the monitor)
never blocks: what the peer cannot take yet waits in a queue of at most ``limit`` bytes, whole frames only,
and ``flush()`` sends more once the socket is writable. A send that would pass the bound raises ChannelFull
and queues nothing, so the framing stays intact; callers keep well under it by pausing what feeds them.
"""

from __future__ import annotations

import itertools
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from micropod import guestmsg, wire
from micropod.errors import AgentError, ChannelFull, ProtocolError, TimeoutExpired

Frame = tuple[int, int, bytes]
OUT_LIMIT = 4 << 20  # a monitor socket's queue of unsent bytes


class FramedSocket:
    def __init__(self, sock: socket.socket, limit: int = OUT_LIMIT) -> None:
        self.sock = sock
        self.limit = limit
        self._reader = wire.FrameReader()
        self._ready: list[Frame] = []
        self._out = bytearray()
        self.closed = False

    @property
    def backlog(self) -> int:
        """Bytes queued but not yet sent."""
        return len(self._out)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send_control(self, message: dict[str, Any]) -> None:
        self._send(wire.encode_control(message))

    def send_data(self, stream: int, data: bytes) -> None:
        for start in range(0, len(data), wire.MAX_PAYLOAD):
            self._send(wire.encode(wire.DATA, stream, data[start:start + wire.MAX_PAYLOAD]))

    def send_eof(self, stream: int) -> None:
        self._send(wire.encode(wire.EOF, stream))

    def _send(self, data: bytes) -> None:
        if self.closed:
            raise AgentError("channel closed")
        if self.sock.getblocking():
            try:
                self.sock.sendall(data)
            except OSError as exc:
                self.closed = True
                raise AgentError(f"channel write failed: {exc}") from exc
            return
        if len(self._out) + len(data) > self.limit:
            raise ChannelFull(f"the peer is not reading: {len(self._out)} bytes wait to be sent")
        self._out += data
        self.flush()

    def flush(self) -> None:
        """Send what the socket takes now; AgentError if the peer has gone."""
        while self._out:
            try:
                sent = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.closed = True
                self._out.clear()
                raise AgentError(f"channel write failed: {exc}") from exc
            del self._out[:sent]

    def pump(self) -> list[Frame]:
        """Read what is available now (the socket is readable) and return the whole frames."""
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return []
        except OSError as exc:
            self.closed = True
            raise AgentError(f"channel read failed: {exc}") from exc
        if not data:
            self.closed = True
            return []
        try:
            return self._reader.feed(data)
        except wire.FrameError as exc:
            self.closed = True  # nothing after a bad header can be framed again
            raise ProtocolError(str(exc)) from exc

    def next_frame(self, deadline: float, also_watch: int | None = None) -> Frame | None:
        """Block until one frame arrives, sending the queue meanwhile; None if ``also_watch`` became readable first."""
        while not self._ready:
            if self.closed:
                raise AgentError("channel closed")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutExpired("timed out waiting on the channel")
            watch = [self.sock] + ([also_watch] if also_watch is not None else [])
            readable, writable, _ = select.select(watch, [self.sock] if self._out else [], [], remaining)
            if also_watch is not None and also_watch in readable:
                return None
            if writable:
                self.flush()
            if self.sock in readable:
                self._ready.extend(self.pump())
        return self._ready.pop(0)

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def decode(payload: bytes) -> dict[str, Any]:
    try:
        return wire.decode_control(payload)
    except wire.FrameError as exc:
        raise ProtocolError(str(exc)) from exc


class AgentLink:
    """Requests to the guest agent; frames that are not the awaited reply go to ``on_frame``."""

    def __init__(self, channel: FramedSocket, on_frame: Callable[[Frame], None]) -> None:
        channel.sock.setblocking(False)  # a guest that stops reading must never block the monitor
        self.channel = channel
        self.on_frame = on_frame
        self._ids = itertools.count(1)

    def send(self, op: str, **fields: Any) -> int:
        req = next(self._ids)
        self.channel.send_control({"op": op, "req": req, **fields})
        return req

    def request(self, op: str, deadline: float, vmm_fd: int | None = None, **fields: Any) -> guestmsg.Reply:
        req = self.send(op, **fields)
        while True:
            frame = self.channel.next_frame(deadline, also_watch=vmm_fd)
            if frame is None:
                raise AgentError(f"the VM ended while waiting for the agent to answer {op!r}")
            kind, _, payload = frame
            if kind == wire.CONTROL:
                try:
                    message = guestmsg.parse(payload)
                except guestmsg.BadGuestMessage:
                    message = None  # on_frame refuses it
                if isinstance(message, guestmsg.Reply) and message.req == req:
                    return message
            self.on_frame(frame)
