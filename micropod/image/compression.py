"""Layer compression, recognised by magic bytes: registries and tools label media types loosely
(docker save writes uncompressed layers; some gzip layers are labelled as plain tar)."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import queue
import threading
import zlib
from typing import IO, cast

import zstandard

GZIP, ZSTD, XZ, BZIP2, NONE = "gzip", "zstd", "xz", "bzip2", "none"
_MAGIC = ((b"\x1f\x8b", GZIP), (b"\x28\xb5\x2f\xfd", ZSTD), (b"\xfd7zXZ\x00", XZ), (b"BZh", BZIP2))


def detect(head: bytes) -> str:
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return NONE


class _GzipReader(io.RawIOBase):
    """gzip (concatenated members too) straight through zlib in large pieces. GzipFile feeds zlib 8 KiB
    at a time and checks the CRC again in Python; the layer's sha256 already guards the bytes, and zlib
    checks each member's trailer itself."""

    def __init__(self, raw: io.BufferedReader, chunk: int = 1 << 20) -> None:
        super().__init__()
        self._raw = raw
        self._chunk = chunk
        self._inflate = zlib.decompressobj(wbits=31)
        self._pending = b""  # compressed input not yet consumed
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        while not self._done:
            if self._inflate.eof:
                rest = self._inflate.unused_data
                self._inflate = zlib.decompressobj(wbits=31)
                self._pending = (rest + self._pending).lstrip(b"\0")  # zero padding after a member
                while not self._pending:
                    more = self._raw.read(self._chunk)
                    if not more:
                        self._done = True
                        return 0
                    self._pending = more.lstrip(b"\0")
            if not self._pending:
                self._pending = self._raw.read(self._chunk)
                if not self._pending:
                    raise EOFError("compressed file ended before the end-of-stream marker was reached")
            data = self._inflate.decompress(self._pending, len(view))
            self._pending = self._inflate.unconsumed_tail
            if data:
                view[: len(data)] = data
                return len(data)
        return 0


def decompressed(raw: io.BufferedReader) -> IO[bytes]:
    """A reader of the uncompressed bytes; the wrappers never close `raw`, its owner does."""
    kind = detect(raw.peek(6)[:6])
    if kind == GZIP:
        return cast(IO[bytes], io.BufferedReader(_GzipReader(raw), 1 << 20))
    if kind == ZSTD:
        reader: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                                        closefd=False)
        return reader
    if kind == XZ:
        return lzma.LZMAFile(raw)
    if kind == BZIP2:
        return bz2.BZ2File(raw)
    return raw


class Readahead:
    """``source`` read by a thread of its own, up to ``depth`` chunks ahead of the reader. What that thread does
    (the blob's reads, its sha256, the inflating) releases the GIL, so a layer decompresses on one core while
    the reader parses its tar on the other. An error of the source is raised to the reader, in order; ``close``
    stops the thread and waits for it, so the source is never read after it."""

    def __init__(self, source: IO[bytes], chunk: int = 1 << 20, depth: int = 4) -> None:
        self._source, self._chunk = source, chunk
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(depth)
        self._stop = threading.Event()
        self._pending = b""
        self._eof = False
        self._thread = threading.Thread(target=self._fill, name="layer-readahead", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._source.read(self._chunk)
                self._put(data)
                if not data:
                    return
        except BaseException as exc:  # the reader's to raise, in order
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            parts = []
            while part := self.read(self._chunk):
                parts.append(part)
            return b"".join(parts)
        if not self._pending:
            if self._eof:
                return b""
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if not item:
                self._eof = True
                return b""
            self._pending = item
        data, self._pending = self._pending[:size], self._pending[size:]
        return data

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# What decompressing may raise on corrupt input, for callers that translate it.
DECOMPRESSION_ERRORS: tuple[type[Exception], ...] = (
    EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError, zstandard.ZstdError, OSError, ValueError)
