"""SPDY/3.1 as Kubernetes uses it for streaming (what moby/spdystream speaks): a session over one upgraded
connection, streams that the client opens with SYN_STREAM, header blocks compressed with one zlib context per
direction, and data frames. Flow control windows are granted generously and never waited on, as spdystream does.

Every length is checked against a cap before anything is read into memory: the peer is a network client. What
it sends is queued within a byte budget per stream and per session; past it the session stops reading (TCP
pushes back), and a stream that nobody reads for UNREAD_TIMEOUT is reset rather than holding the session. A
stream both sides have finished is forgotten, so MAX_STREAMS bounds the open ones, not a session's life.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from micropod.cri.streaming.spdy_dictionary import DICTIONARY

VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
FLAG_FIN = 0x01
MAX_FRAME = 1 << 20  # larger than any frame spdystream sends (its data frames are at most 32 KiB)
MAX_HEADERS = 64 << 10
MAX_STREAMS = 64  # open at once
MAX_SESSION_STREAMS = 1024  # in a session's life
SEND_TIMEOUT = 30.0
STREAM_QUEUE_BYTES = 256 << 10  # what a stream holds unread (one frame more if it held nothing)
SESSION_QUEUE_BYTES = 1 << 20  # what all of a session's streams hold unread together
UNREAD_TIMEOUT = 30.0  # a stream whose queue stays full this long is reset
RST_PROTOCOL_ERROR, RST_REFUSED, RST_CANCEL = 1, 3, 5
WINDOW_GRANT = 1 << 30


class SpdyError(Exception):
    """The peer broke the protocol; the session ends."""


def read_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 16))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


@dataclass
class Frame:
    control: bool
    kind: int  # a control frame's type; 0 for data
    flags: int
    stream_id: int  # a data frame's stream, or the one a stream-bearing control frame names
    payload: bytes


def read_frame(sock: socket.socket) -> Frame:
    head = read_exact(sock, 8)
    first, flags_length = struct.unpack(">II", head)
    flags, length = flags_length >> 24, flags_length & 0xFFFFFF
    if length > MAX_FRAME:
        raise SpdyError(f"a frame of {length} bytes is over the limit")
    payload = read_exact(sock, length)
    if first & 0x80000000:
        version, kind = (first >> 16) & 0x7FFF, first & 0xFFFF
        if version != VERSION:
            raise SpdyError(f"SPDY version {version}, not 3")
        stream_id = 0
        if kind in (SYN_STREAM, SYN_REPLY, RST_STREAM, HEADERS, WINDOW_UPDATE):
            if len(payload) < 4:
                raise SpdyError("a control frame too short for its stream id")
            stream_id = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF
        return Frame(True, kind, flags, stream_id, payload)
    return Frame(False, 0, flags, first & 0x7FFFFFFF, payload)


def control_frame(kind: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, data: bytes, fin: bool = False) -> bytes:
    return struct.pack(">II", stream_id & 0x7FFFFFFF, ((FLAG_FIN if fin else 0) << 24) | len(data)) + data


class HeaderCodec:
    """One direction's zlib context: every header block of a session is part of one stream."""

    def __init__(self) -> None:
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY,
                                         zdict=DICTIONARY)
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)

    def encode(self, headers: dict[str, list[str]]) -> bytes:
        block = [struct.pack(">I", len(headers))]
        for name, values in headers.items():
            value = b"\0".join(v.encode() for v in values)
            block += [struct.pack(">I", len(name)), name.lower().encode(), struct.pack(">I", len(value)), value]
        return self._deflate.compress(b"".join(block)) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    def decode(self, data: bytes) -> dict[str, list[str]]:
        try:
            raw = self._inflate.decompress(data, MAX_HEADERS)
        except zlib.error as exc:
            raise SpdyError(f"a header block does not inflate: {exc}") from None
        if self._inflate.unconsumed_tail:
            raise SpdyError("a header block is over the limit")
        return parse_header_block(raw)


def parse_header_block(raw: bytes) -> dict[str, list[str]]:
    def take(offset: int) -> tuple[bytes, int]:
        if offset + 4 > len(raw):
            raise SpdyError("a truncated header block")
        size = struct.unpack(">I", raw[offset:offset + 4])[0]
        end = offset + 4 + size
        if end > len(raw):
            raise SpdyError("a header longer than its block")
        return raw[offset + 4:end], end

    if len(raw) < 4:
        raise SpdyError("a header block without its count")
    count, offset = struct.unpack(">I", raw[:4])[0], 4
    if count > 256:
        raise SpdyError("too many headers")
    headers: dict[str, list[str]] = {}
    for _ in range(count):
        name, offset = take(offset)
        value, offset = take(offset)
        headers.setdefault(name.decode(errors="replace").lower(), []).extend(
            v.decode(errors="replace") for v in value.split(b"\0"))
    return headers


@dataclass
class Stream:
    session: Session
    stream_id: int
    headers: dict[str, list[str]]
    incoming: deque[bytes] = field(default_factory=deque)
    queued: int = 0  # bytes in incoming
    stalled_since: float = 0.0  # since when data has waited with no read (while queued)
    finished: threading.Event = field(default_factory=threading.Event)  # the peer's FIN, a reset, or the end
    closed: bool = False

    def header(self, name: str) -> str:
        return (self.headers.get(name) or [""])[0]

    def read(self) -> bytes | None:
        """The next data the peer sent; None once it has finished (or the session ended)."""
        budget = self.session.budget
        with budget:
            while not self.incoming:
                if self.finished.is_set():
                    return None
                budget.wait(0.2)
            data = self.incoming.popleft()
            self.queued -= len(data)
            self.session.queued -= len(data)
            self.stalled_since = time.monotonic()  # progress: what still waits, waits from now
            budget.notify_all()
            return data

    def deliver(self, data: bytes) -> None:
        """From the session's reader: waits while the budgets are spent, unless nobody will read it any more. A
        stream whose data has waited UNREAD_TIMEOUT with no read at all (a slow reader that reads is never one)
        is reset, its data dropped, whichever stream it is that holds the budget."""
        session = self.session
        while True:
            with session.budget:
                if self.finished.is_set() or session.ended.is_set() or session.streams.get(self.stream_id) is not self:
                    return  # finished or forgotten: nobody reads it any more
                if not ((self.queued and self.queued + len(data) > STREAM_QUEUE_BYTES)
                        or (session.queued and session.queued + len(data) > SESSION_QUEUE_BYTES)):
                    if not self.incoming:
                        self.stalled_since = time.monotonic()
                    self.incoming.append(data)
                    self.queued += len(data)
                    session.queued += len(data)
                    return
                stale = session.stale_streams()
                if not stale:
                    session.budget.wait(0.2)
            for stream in stale:  # outside the lock: a client that does not read holds no reader up
                session.reset(stream)

    def write(self, data: bytes) -> None:
        for start in range(0, len(data), 32 << 10):
            self.session.send(data_frame(self.stream_id, data[start:start + (32 << 10)]))

    def close(self) -> None:
        """Our half: a FIN, once."""
        if not self.closed:
            self.closed = True
            try:
                self.session.send(data_frame(self.stream_id, b"", fin=True))
            finally:
                self.session.forget_if_done(self)


class Session:
    """The server's side. ``on_stream`` hears each stream the client opens, after its SYN_REPLY."""

    def __init__(self, sock: socket.socket, on_stream: Callable[[Stream], None]) -> None:
        self.sock = sock
        self.on_stream = on_stream
        self.codec = HeaderCodec()
        self.streams: dict[int, Stream] = {}  # the open ones
        self.last_stream_id = 0
        self._send_lock = threading.Lock()
        self.ended = threading.Event()
        self.budget = threading.Condition()  # guards every stream's queue and ``queued``
        self.queued = 0  # bytes queued unread, over all streams
        self.opened = 0  # streams this session ever opened
        # a client that stops reading what we send cannot hold a writer (and the session) forever
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(SEND_TIMEOUT), 0))

    def stale_streams(self) -> list[Stream]:
        """Under the budget's lock: the streams whose data has waited UNREAD_TIMEOUT unread, marked finished and
        emptied (their resets to be sent outside the lock)."""
        now = time.monotonic()
        stale = [s for s in self.streams.values() if s.queued and now - s.stalled_since > UNREAD_TIMEOUT]
        for stream in stale:
            stream.closed = True
            stream.finished.set()
            self._discard(stream)
        return stale

    def _discard(self, stream: Stream) -> None:
        """Under the budget's lock: what ``stream`` still held unread, dropped and given back to the budget."""
        if stream.queued:
            self.queued -= stream.queued
            stream.queued = 0
            stream.incoming.clear()
            self.budget.notify_all()

    def forget_if_done(self, stream: Stream) -> None:
        """A stream both sides finished: dropped, with what it still held unread."""
        if stream.closed and stream.finished.is_set():
            with self.budget:
                if self.streams.get(stream.stream_id) is stream:
                    del self.streams[stream.stream_id]
                self._discard(stream)

    def finish(self, stream: Stream) -> None:
        """The peer's half is done (FIN or reset): its reader wakes at once."""
        stream.finished.set()
        with self.budget:
            self.budget.notify_all()
        self.forget_if_done(stream)

    def reset(self, stream: Stream) -> None:
        """Cancel a stream (RST_STREAM): nobody read it."""
        stream.closed = True
        stream.finished.set()
        with contextlib.suppress(OSError):
            self.send(control_frame(RST_STREAM, 0, struct.pack(">II", stream.stream_id, RST_CANCEL)))
        self.forget_if_done(stream)

    def send(self, frame: bytes) -> None:
        with self._send_lock:
            try:
                self.sock.sendall(frame)
            except OSError:
                self.ended.set()
                raise

    def serve(self) -> None:
        """Read frames until the connection ends; every stream hears the end."""
        try:
            while not self.ended.is_set():
                self._dispatch(read_frame(self.sock))
        except (EOFError, OSError, SpdyError):
            pass
        finally:
            self.ended.set()
            for stream in list(self.streams.values()):
                stream.finished.set()
            with self.budget:
                self.budget.notify_all()

    def _dispatch(self, frame: Frame) -> None:
        if not frame.control:
            stream = self.streams.get(frame.stream_id)
            if stream is None:
                return
            if frame.payload:
                stream.deliver(frame.payload)
                self.send(control_frame(WINDOW_UPDATE, 0, struct.pack(">II", frame.stream_id, len(frame.payload))))
            if frame.flags & FLAG_FIN:
                self.finish(stream)
        elif frame.kind == SYN_STREAM:
            self._open(frame)
        elif frame.kind == RST_STREAM:
            stream = self.streams.get(frame.stream_id)
            if stream is not None:
                stream.closed = True
                self.finish(stream)
        elif frame.kind == PING:
            self.send(control_frame(PING, 0, frame.payload[:4]))
        elif frame.kind == GOAWAY:
            self.ended.set()
        elif frame.kind == HEADERS and len(frame.payload) > 4:
            self.codec.decode(frame.payload[4:])  # keeps the zlib context in step; nothing in it matters here
        # SETTINGS and WINDOW_UPDATE: noted and ignored, as spdystream does

    def _open(self, frame: Frame) -> None:
        if len(frame.payload) < 10:
            raise SpdyError("a SYN_STREAM too short")
        headers = self.codec.decode(frame.payload[10:])
        stream_id = frame.stream_id
        # SPDY's stream ids only grow: one at or below the last is a reused id, not a new stream; and a session
        # opens at most MAX_SESSION_STREAMS in its life (the handlers keep what they were given)
        self.opened += 1
        if (stream_id <= self.last_stream_id or stream_id % 2 == 0 or len(self.streams) >= MAX_STREAMS
                or self.opened > MAX_SESSION_STREAMS):
            self.send(control_frame(RST_STREAM, 0, struct.pack(">II", stream_id, RST_REFUSED)))
            return
        self.last_stream_id = stream_id
        stream = Stream(self, stream_id, headers)
        self.streams[stream_id] = stream
        self.send(control_frame(SYN_REPLY, 0, struct.pack(">I", stream_id) + self.codec.encode({})))
        self.send(control_frame(WINDOW_UPDATE, 0, struct.pack(">II", stream_id, WINDOW_GRANT)))
        if frame.flags & FLAG_FIN:
            self.finish(stream)
        self.on_stream(stream)

    def close(self) -> None:
        if not self.ended.is_set():
            with contextlib.suppress(OSError):
                self.send(control_frame(GOAWAY, 0, struct.pack(">II", 0, 0)))
        self.ended.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
