"""Layer compression, recognised by magic bytes: registries and tools label media types loosely
(docker save writes uncompressed layers; some gzip layers are labelled as plain tar)."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import types
import zlib
from typing import IO, cast

import zstandard

_inflate_lib: types.ModuleType
INFLATE_ERRORS: tuple[type[Exception], ...]
try:  # ISA-L's inflate, the same API as zlib's, about twice as fast here (python-isal, from PyPI)
    from isal import isal_zlib

    _inflate_lib = isal_zlib
    INFLATE_ERRORS = (zlib.error, cast(type[Exception], isal_zlib.error))
except ImportError:  # pragma: no cover (a checkout without it still works)
    _inflate_lib = zlib
    INFLATE_ERRORS = (zlib.error,)

GZIP, ZSTD, XZ, BZIP2, NONE = "gzip", "zstd", "xz", "bzip2", "none"
_MAGIC = ((b"\x1f\x8b", GZIP), (b"\x28\xb5\x2f\xfd", ZSTD), (b"\xfd7zXZ\x00", XZ), (b"BZh", BZIP2))


def detect(head: bytes) -> str:
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return NONE


class _GzipReader(io.RawIOBase):
    """gzip (concatenated members too) straight through ISA-L's (else zlib's) inflate in large pieces. GzipFile
    feeds zlib 8 KiB at a time and checks the CRC again in Python; the layer's sha256 already guards the bytes,
    and inflate checks each member's trailer itself."""

    def __init__(self, raw: io.BufferedReader, chunk: int = 1 << 20) -> None:
        super().__init__()
        self._raw = raw
        self._chunk = chunk
        self._inflate = _inflate_lib.decompressobj(wbits=31)
        self._pending = b""  # compressed input not yet consumed
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        while not self._done:
            if self._inflate.eof:
                rest = self._inflate.unused_data
                self._inflate = _inflate_lib.decompressobj(wbits=31)
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


# What decompressing may raise on corrupt input, for callers that translate it.
DECOMPRESSION_ERRORS: tuple[type[Exception], ...] = (
    EOFError, gzip.BadGzipFile, *INFLATE_ERRORS, lzma.LZMAError, zstandard.ZstdError, OSError, ValueError)
