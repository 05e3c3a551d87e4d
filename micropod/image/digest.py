"""Digests and a reader that verifies one while it streams.

micropod stores and verifies sha256 only; other algorithms are refused with a clear message rather than
trusted unchecked.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import BinaryIO

from micropod.errors import DigestMismatchError, ImageError

_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")
_ANY_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


def check_digest(digest: str) -> str:
    """Return `digest` if it is a well-formed sha256 digest, else raise ImageError."""
    if _SHA256.match(digest):
        return digest
    if _ANY_DIGEST.match(digest):
        raise ImageError(f"unsupported digest {digest!r}: only sha256 is supported")
    raise ImageError(f"invalid digest {digest!r}")


def digest_hex(digest: str) -> str:
    return check_digest(digest).partition(":")[2]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class VerifyingReader(io.RawIOBase):
    """Reads a blob and checks its size and digest; a mismatch raises when the end is reached.

    A caller must read to EOF for the check to happen: `drain()` does that for readers that stop early
    (a tar reader stops at the end-of-archive marker, not at the end of the blob).
    """

    def __init__(self, raw: BinaryIO, digest: str, size: int | None = None, *, name: str = "") -> None:
        super().__init__()
        self._raw = raw
        self._digest = check_digest(digest)
        self._expected_size = size
        self._name = name or digest
        self._hash = hashlib.sha256()
        self._seen = 0
        self._verified = False

    @property
    def digest(self) -> str:
        return self._digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        n = self._raw.readinto(view) if hasattr(self._raw, "readinto") else self._read_copy(view)
        if n is None:  # pragma: no cover - blocking files never return None
            return 0
        if n:
            self._hash.update(view[:n])
            self._seen += n
            if self._expected_size is not None and self._seen > self._expected_size:
                raise DigestMismatchError(
                    f"blob {self._name} is larger than its declared size {self._expected_size}")
        elif not self._verified:
            self._verify()
        return n

    def _read_copy(self, view: memoryview) -> int:
        chunk = self._raw.read(len(view))
        view[: len(chunk)] = chunk
        return len(chunk)

    def _verify(self) -> None:
        if self._expected_size is not None and self._seen != self._expected_size:
            raise DigestMismatchError(
                f"blob {self._name} is truncated: {self._seen} of {self._expected_size} bytes")
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self._digest:
            raise DigestMismatchError(f"blob {self._name} does not match its digest (got {actual})")
        self._verified = True

    def drain(self) -> None:
        """Read whatever is left so the digest gets checked."""
        buf = bytearray(1 << 20)
        while self.readinto(buf):
            pass

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()
