"""Layer compression, recognised by magic bytes: registries and tools label media types loosely
(docker save writes uncompressed layers; some gzip layers are labelled as plain tar)."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
from typing import IO, cast

import zstandard

GZIP, ZSTD, XZ, BZIP2, NONE = "gzip", "zstd", "xz", "bzip2", "none"
_MAGIC = ((b"\x1f\x8b", GZIP), (b"\x28\xb5\x2f\xfd", ZSTD), (b"\xfd7zXZ\x00", XZ), (b"BZh", BZIP2))


def detect(head: bytes) -> str:
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return NONE


def decompressed(raw: io.BufferedReader) -> IO[bytes]:
    """A reader of the uncompressed bytes; the wrappers never close `raw`, its owner does."""
    kind = detect(raw.peek(6)[:6])
    if kind == GZIP:
        return cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
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
    EOFError, gzip.BadGzipFile, lzma.LZMAError, zstandard.ZstdError, OSError, ValueError)
