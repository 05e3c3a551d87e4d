"""The server's side of RFC 6455 WebSocket, as Kubernetes' channel protocols use it: each message is one
channel's data (its first byte names the channel). Client frames must be masked; sizes are capped."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import socket
import struct
import threading

from micropod.cri.streaming.spdy import read_exact

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_MESSAGE = 1 << 20


class WebSocketError(Exception):
    """The peer broke the protocol; the connection ends."""


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def frame(opcode: int, payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        head = struct.pack(">BB", 0x80 | opcode, size)
    elif size < 1 << 16:
        head = struct.pack(">BBH", 0x80 | opcode, 126, size)
    else:
        head = struct.pack(">BBQ", 0x80 | opcode, 127, size)
    return head + payload


def unmask(data: bytes, mask: bytes) -> bytes:
    if not data:
        return data
    key = (mask * (len(data) // 4 + 1))[:len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(len(data), "big")


class WebSocket:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self.closed = False

    def send(self, opcode: int, payload: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(frame(opcode, payload))

    def receive(self) -> tuple[int, bytes] | None:
        """The next whole data message (opcode, payload); None when the peer closes. Pings are answered."""
        message = b""
        opcode = None
        while True:
            first, second = read_exact(self.sock, 2)
            fin, kind = first & 0x80, first & 0x0F
            if not second & 0x80:
                raise WebSocketError("a client frame that is not masked")
            size = second & 0x7F
            if size == 126:
                size = struct.unpack(">H", read_exact(self.sock, 2))[0]
            elif size == 127:
                size = struct.unpack(">Q", read_exact(self.sock, 8))[0]
            if size + len(message) > MAX_MESSAGE:
                raise WebSocketError("a message over the limit")
            mask = read_exact(self.sock, 4)
            data = unmask(read_exact(self.sock, size), mask)
            if kind >= CLOSE:  # control frames come whole, even between a message's fragments
                if kind == CLOSE:
                    self.close()
                    return None
                if kind == PING:
                    self.send(PONG, data[:125])
                continue
            if kind != CONTINUATION:
                if opcode is not None:
                    raise WebSocketError("a new message before the last one ended")
                opcode = kind
            elif opcode is None:
                raise WebSocketError("a continuation with no message")
            message += data
            if fin:
                return opcode, message

    def close(self, code: int = 1000) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.send(CLOSE, struct.pack(">H", code))
