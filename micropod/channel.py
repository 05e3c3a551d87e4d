"""A framed stream socket (agent channel or monitor control connection), host side."""

from __future__ import annotations

import itertools
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from micropod.agent import protocol
from micropod.errors import AgentError, ProtocolError, TimeoutExpired

Frame = tuple[int, int, bytes]


class FramedSocket:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = protocol.FrameReader()
        self._ready: list[Frame] = []
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send_control(self, message: dict[str, Any]) -> None:
        self._send(protocol.encode_control(message))

    def send_data(self, stream: int, data: bytes) -> None:
        for start in range(0, len(data), protocol.MAX_PAYLOAD):
            self._send(protocol.encode(protocol.DATA, stream, data[start:start + protocol.MAX_PAYLOAD]))

    def send_eof(self, stream: int) -> None:
        self._send(protocol.encode(protocol.EOF, stream))

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self.closed = True
            raise AgentError(f"channel write failed: {exc}") from exc

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
        except protocol.FrameError as exc:
            raise ProtocolError(str(exc)) from exc

    def next_frame(self, deadline: float, also_watch: int | None = None) -> Frame | None:
        """Block until one frame arrives; None if ``also_watch`` became readable first."""
        while not self._ready:
            if self.closed:
                raise AgentError("channel closed")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutExpired("timed out waiting on the channel")
            watch = [self.sock] + ([also_watch] if also_watch is not None else [])
            readable, _, _ = select.select(watch, [], [], remaining)
            if also_watch is not None and also_watch in readable:
                return None
            if self.sock in readable:
                self._ready.extend(self.pump())
        return self._ready.pop(0)

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def decode(payload: bytes) -> dict[str, Any]:
    try:
        return protocol.decode_control(payload)
    except protocol.FrameError as exc:
        raise ProtocolError(str(exc)) from exc


class AgentLink:
    """Requests to the guest agent; frames that are not the awaited reply go to ``on_frame``."""

    def __init__(self, channel: FramedSocket, on_frame: Callable[[Frame], None]) -> None:
        self.channel = channel
        self.on_frame = on_frame
        self._ids = itertools.count(1)

    def send(self, op: str, **fields: Any) -> int:
        req = next(self._ids)
        self.channel.send_control({"op": op, "req": req, **fields})
        return req

    def request(self, op: str, deadline: float, vmm_fd: int | None = None, **fields: Any) -> dict[str, Any]:
        req = self.send(op, **fields)
        while True:
            frame = self.channel.next_frame(deadline, also_watch=vmm_fd)
            if frame is None:
                raise AgentError(f"the VM ended while waiting for the agent to answer {op!r}")
            kind, _, payload = frame
            if kind == protocol.CONTROL:
                message = decode(payload)
                if message.get("req") == req and message["op"] in ("ok", "error"):
                    return message
            self.on_frame(frame)
