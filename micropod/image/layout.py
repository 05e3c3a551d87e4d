"""The OCI image layout on disk: its files and locks, blobs stored only once verified, and index.json
read and replaced atomically. What the entries mean (references, images, what is reachable) is the store's.

    oci-layout, index.json          the layout
    blobs/sha256/<hex>              content, written only after its digest checked out
    ingest/                         temp files, on the same filesystem so a rename publishes them
    index.json.lock, gc.lock        flock files
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

from micropod.errors import DigestMismatchError, ImageError, NotFoundError
from micropod.fsutil import PRIVATE_FILE, atomic_write, flock, fsync_dir, private_dir
from micropod.image.digest import VerifyingReader, check_digest, digest_hex, sha256_digest
from micropod.image.model import OCI_INDEX, OCI_LAYOUT_VERSION, Descriptor, canonical_json, parse_index

CHUNK = 1 << 20


class OciLayout:
    """The storage under ImageStore, which adds what the index entries mean."""

    def __init__(self, path: Path) -> None:
        self.path = path

    # -- layout ---------------------------------------------------------------------------------------

    @property
    def _blobs(self) -> Path:
        return self.path / "blobs" / "sha256"

    @property
    def _ingest_dir(self) -> Path:
        return self.path / "ingest"

    @property
    def _index(self) -> Path:
        return self.path / "index.json"

    def init(self) -> None:
        """Create the layout if it is missing; cheap and safe to call from every writer."""
        if (self.path / "oci-layout").exists() and self._index.exists() and self._ingest_dir.is_dir():
            return
        try:
            for d in (self._blobs, self._ingest_dir):
                private_dir(d)
            with flock(self.path / "index.json.lock"):
                if not (self.path / "oci-layout").exists():
                    atomic_write(self.path / "oci-layout",
                                 canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}),
                                 tmp_dir=self._ingest_dir, mode=PRIVATE_FILE)
                if not self._index.exists():
                    self._write_index([])
        except OSError as exc:
            raise ImageError(f"cannot initialise image store {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Keep `gc()` away while blobs are ingested and until the image using them is tagged."""
        self.init()
        with flock(self.path / "gc.lock", exclusive=False):
            yield

    # -- blobs ----------------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self._blobs / digest_hex(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def open_blob(self, digest: str, size: int | None = None) -> io.BufferedReader:
        """A reader of the blob that raises DigestMismatchError on reaching EOF if the content is bad."""
        path = self.blob_path(digest)
        try:
            raw = path.open("rb", buffering=0)
        except FileNotFoundError as exc:
            raise NotFoundError(f"blob {digest} is missing from the image store") from exc
        return io.BufferedReader(VerifyingReader(raw, digest, size), CHUNK)

    def read_blob(self, digest: str, size: int | None = None) -> bytes:
        with self.open_blob(digest, size) as reader:
            return reader.read()

    def put_blob(self, data: bytes, media_type: str = "application/octet-stream") -> Descriptor:
        digest = self.ingest(io.BytesIO(data), sha256_digest(data), len(data))
        return Descriptor(media_type, digest, len(data))

    def ingest(self, stream: IO[bytes], expected_digest: str | None = None, size: int | None = None) -> str:
        """Stream a blob into the store; it appears under its digest only if that digest checks out.

        Skips the copy (without reading `stream`) when the expected blob is already present.
        """
        if expected_digest is not None:
            check_digest(expected_digest)
            if self.has_blob(expected_digest):
                return expected_digest
        with self.writing():
            fd, tmp = tempfile.mkstemp(dir=self._ingest_dir, prefix="blob-")
            try:
                digest = self._copy_verified(stream, fd, expected_digest, size)
                os.replace(tmp, self.blob_path(digest))
                fsync_dir(self._blobs)
                return digest
            except OSError as exc:
                raise ImageError(f"cannot store blob {expected_digest or '(unknown digest)'}: {exc}") from exc
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def _copy_verified(self, stream: IO[bytes], fd: int, expected: str | None, size: int | None) -> str:
        hasher, seen = hashlib.sha256(), 0
        name = expected or "being ingested"
        readinto = getattr(stream, "readinto", None)
        if isinstance(stream, io.RawIOBase) and type(stream).readinto is io.RawIOBase.readinto:
            readinto = None  # a raw stream that implements only read()
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        with os.fdopen(fd, "wb", buffering=0) as out:
            while True:
                # readinto fills one reused buffer: no allocation or copy per chunk (network pulls).
                if readinto is not None:
                    n = readinto(buffer)
                    chunk: bytes | memoryview = view[:n]
                else:
                    chunk = stream.read(CHUNK)
                    n = len(chunk)
                if not n:
                    break
                hasher.update(chunk)
                seen += n
                if size is not None and seen > size:
                    raise DigestMismatchError(f"blob {name} is larger than its declared size {size}")
                while chunk:
                    written = out.write(chunk)
                    chunk = memoryview(chunk)[written or 0:]
            os.fchmod(out.fileno(), PRIVATE_FILE)
            os.fsync(out.fileno())
        if size is not None and seen != size:
            raise DigestMismatchError(f"blob {name} is truncated: {seen} of {size} bytes")
        digest = "sha256:" + hasher.hexdigest()
        if expected is not None and digest != expected:
            raise DigestMismatchError(f"blob {expected} does not match its digest (got {digest})")
        return digest

    # -- index ----------------------------------------------------------------------------------------

    def _read_index(self) -> list[Descriptor]:
        try:
            data = self._index.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ImageError(f"cannot read {self._index}: {exc}") from exc
        return list(parse_index(data, str(self._index)))

    def _write_index(self, entries: Sequence[Descriptor]) -> None:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [e.to_json() for e in entries]}
        atomic_write(self._index, json.dumps(doc, indent=2).encode() + b"\n", tmp_dir=self._ingest_dir,
                     mode=PRIVATE_FILE)

    def _update_index(self, change: Callable[[list[Descriptor]], list[Descriptor]]) -> None:
        self.init()
        with flock(self.path / "index.json.lock"):
            entries = self._read_index()
            updated = change(list(entries))
            if updated != entries:
                self._write_index(updated)
