"""A small SPDY/3.1 client for the streaming tests, written apart from the server's code (only the SPDY/3 header
dictionary, a constant of the spec, is shared): the HTTP upgrade, frames, one zlib context per direction for
header blocks, and the streams that Kubernetes' remotecommand and portforward.k8s.io protocols open.

Like spdystream it grants no flow-control windows and ignores the peer's: the server grants us 1 GiB up front.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field

from micropod.cri.streaming.spdy_dictionary import DICTIONARY

SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
FIN = 0x01
REMOTECOMMAND = "v4.channel.k8s.io"
PORTFORWARD = "portforward.k8s.io"


class Conn:
    """A socket with a pushback buffer: reading the HTTP head may take bytes that already belong to SPDY."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise EOFError("the server closed the connection")
        self.pending += chunk

    def read_exact(self, size: int) -> bytes:
        while len(self.pending) < size:
            self._fill()
        data, self.pending = self.pending[:size], self.pending[size:]
        return data

    def read_until(self, marker: bytes, limit: int = 1 << 16) -> bytes:
        while marker not in self.pending:
            if len(self.pending) > limit:
                raise ValueError("no end of the HTTP head")
            self._fill()
        head, _, self.pending = self.pending.partition(marker)
        return head

    def read_rest(self) -> bytes:
        with_rest = self.pending
        self.pending = b""
        while chunk := self.sock.recv(1 << 16):
            with_rest += chunk
        return with_rest


@dataclass
class Response:
    status: int
    headers: dict[str, list[str]]  # names in lower case
    body: bytes = b""

    def header(self, name: str) -> str:
        return (self.headers.get(name.lower()) or [""])[0]


def http_exchange(sock: socket.socket, method: str, path: str, headers: list[tuple[str, str]]) -> tuple[Response, Conn]:
    """Send one request; read the response's head, and its body unless the protocol switched."""
    lines = [f"{method} {path} HTTP/1.1", "Host: streaming", *(f"{k}: {v}" for k, v in headers), "", ""]
    sock.sendall("\r\n".join(lines).encode())
    conn = Conn(sock)
    status_line, *rest = conn.read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
    parsed: dict[str, list[str]] = {}
    for line in rest:
        name, _, value = line.partition(":")
        parsed.setdefault(name.strip().lower(), []).append(value.strip())
    response = Response(int(status_line.split()[1]), parsed)
    if response.status != 101:
        length = int(response.header("content-length") or 0)
        response.body = conn.read_exact(length) if length else conn.read_rest()
    return response, conn


def upgrade(sock: socket.socket, path: str, protocols: list[str]) -> tuple[Session | None, Response]:
    """The remotecommand or portforward upgrade, as client-go's SPDY round tripper sends it (a POST, one header
    line per protocol offered); a session when the server switched, else None and its refusal."""
    headers = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")]
    headers += [("X-Stream-Protocol-Version", p) for p in protocols]
    response, conn = http_exchange(sock, "POST", path, headers)
    return (Session(conn) if response.status == 101 else None), response


def control(kind: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8000 | 3, kind, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, data: bytes, flags: int = 0) -> bytes:
    return struct.pack(">II", stream_id, (flags << 24) | len(data)) + data


@dataclass
class Stream:
    session: Session
    stream_id: int
    chunks: queue.Queue[bytes | None] = field(default_factory=queue.Queue)  # None: the server's FIN (or reset)
    replied: threading.Event = field(default_factory=threading.Event)
    reset: int | None = None  # a RST_STREAM's status code
    ended: bool = False

    def write(self, data: bytes) -> None:
        self.session.send(data_frame(self.stream_id, data))

    def close(self) -> None:
        """Our half of the stream: an empty data frame with FIN."""
        self.session.send(data_frame(self.stream_id, b"", FIN))

    def read(self, timeout: float) -> bytes | None:
        """The next chunk; None at the end. TimeoutError if nothing came in time."""
        if self.ended:
            return None
        try:
            chunk = self.chunks.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"stream {self.stream_id}: nothing within {timeout}s") from None
        self.ended = chunk is None
        return chunk

    def read_all(self, timeout: float) -> bytes:
        """Everything until the server's FIN, within ``timeout`` in all."""
        deadline, out = time.monotonic() + timeout, b""
        while (chunk := self.read(max(deadline - time.monotonic(), 0.01))) is not None:
            out += chunk
        return out

    def read_until(self, wanted: bytes, timeout: float) -> bytes:
        """What came until ``wanted`` showed up (or the stream ended), within ``timeout``."""
        deadline, out = time.monotonic() + timeout, b""
        while wanted not in out and (chunk := self.read(max(deadline - time.monotonic(), 0.01))) is not None:
            out += chunk
        return out


class Session:
    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY,
                                         zdict=DICTIONARY)
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)
        self.streams: dict[int, Stream] = {}
        self.reply_headers: dict[int, dict[str, list[str]]] = {}
        self.goaway = threading.Event()
        self.pong = threading.Event()
        self.closed = threading.Event()  # the connection ended
        self._next_id = 1
        self._lock = threading.Lock()
        threading.Thread(target=self._read_loop, daemon=True).start()

    def send(self, frame: bytes) -> None:
        with self._lock:
            self.conn.sock.sendall(frame)

    def _headers(self, headers: dict[str, str]) -> bytes:
        block = [struct.pack(">I", len(headers))]
        for name, value in headers.items():
            block += [struct.pack(">I", len(name)), name.lower().encode(), struct.pack(">I", len(value)),
                      value.encode()]
        return self._deflate.compress(b"".join(block)) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    def open(self, headers: dict[str, str], timeout: float = 10.0) -> Stream:
        """A SYN_STREAM, then wait for the server's SYN_REPLY (or its reset)."""
        with self._lock:  # ids and the compressor's order must match the order frames go out
            stream = Stream(self, self._next_id)
            self._next_id += 2
            self.streams[stream.stream_id] = stream
            payload = struct.pack(">IIH", stream.stream_id, 0, 0) + self._headers(headers)
            self.conn.sock.sendall(control(SYN_STREAM, 0, payload))
        if not stream.replied.wait(timeout):
            raise TimeoutError(f"no SYN_REPLY for stream {stream.stream_id}: {headers}")
        return stream

    def remotecommand(self, *names: str) -> dict[str, Stream]:
        """The streams kubectl opens, error first: each of error, stdin, stdout, stderr, resize asked for."""
        return {name: self.open({"streamType": name}) for name in ("error", *names)}

    def forward(self, port: int, request_id: int) -> tuple[Stream, Stream]:
        """One forwarded connection: its error stream, then its data stream (kubectl's order)."""
        error = self.open({"streamType": "error", "port": str(port), "requestID": str(request_id)})
        data = self.open({"streamType": "data", "port": str(port), "requestID": str(request_id)})
        return data, error

    def ping(self, ping_id: int = 1) -> None:
        self.send(control(PING, 0, struct.pack(">I", ping_id)))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.conn.sock.close()

    def _read_loop(self) -> None:
        try:
            while True:
                self._dispatch(*self._read_frame())
        except (EOFError, OSError):
            pass
        finally:
            self.closed.set()
            for stream in self.streams.values():
                stream.replied.set()
                stream.chunks.put(None)

    def _read_frame(self) -> tuple[int | None, int, int, bytes]:
        """(control type or None for data, flags, stream id, payload)."""
        first, flags_length = struct.unpack(">II", self.conn.read_exact(8))
        flags, payload = flags_length >> 24, self.conn.read_exact(flags_length & 0xFFFFFF)
        if not first & 0x80000000:
            return None, flags, first, payload
        kind = first & 0xFFFF
        has_id = kind in (SYN_STREAM, SYN_REPLY, RST_STREAM, HEADERS, WINDOW_UPDATE)
        stream_id = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF if has_id else 0
        return kind, flags, stream_id, payload

    def _dispatch(self, kind: int | None, flags: int, stream_id: int, payload: bytes) -> None:
        stream = self.streams.get(stream_id)
        if kind is None:
            if stream is not None and payload:
                stream.chunks.put(payload)
        elif kind in (SYN_REPLY, HEADERS):
            headers = self._inflate.decompress(payload[4:])  # always inflated: the context must stay in step
            if kind == SYN_REPLY and stream is not None:
                self.reply_headers[stream_id] = _parse_block(headers)
                stream.replied.set()
        elif kind == RST_STREAM and stream is not None:
            stream.reset = struct.unpack(">I", payload[4:8])[0]
            stream.replied.set()
            stream.chunks.put(None)
            return
        elif kind == PING:  # the server's own pings have even ids and are echoed; odd ones answer ours
            if struct.unpack(">I", payload[:4])[0] % 2:
                self.pong.set()
            else:
                self.send(control(PING, 0, payload[:4]))
        elif kind == GOAWAY:
            self.goaway.set()
        if flags & FIN and stream is not None:
            stream.chunks.put(None)


def _parse_block(raw: bytes) -> dict[str, list[str]]:
    count, offset = struct.unpack(">I", raw[:4])[0], 4
    headers: dict[str, list[str]] = {}
    for _ in range(count):
        parts = []
        for _ in range(2):
            size = struct.unpack(">I", raw[offset:offset + 4])[0]
            parts.append(raw[offset + 4:offset + 4 + size])
            offset += 4 + size
        headers[parts[0].decode()] = parts[1].decode().split("\0")
    return headers


def resize_message(width: int, height: int) -> bytes:
    return json.dumps({"Width": width, "Height": height}).encode()
