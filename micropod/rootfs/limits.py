"""Bounds on what one image may make the flattener hold or read: layers are untrusted input.

Each limit gets one clear error (RootfsError). The flattener's memory is linear in the metadata it
keeps (names, link targets, xattrs), which `max_metadata` caps, so no layer can exhaust the host's
memory; `max_size` caps the decompressed bytes, which also bounds any compression ratio.

- PATH_MAX (4096 bytes with the leading "/" and the terminating NUL, as Linux counts) for every path
  and link target: the guest could not open a longer one anyway.
- A depth of 256 components. PATH_MAX alone allows about 2000 ("a/a/…"); real images stay below 64.
- 1,000,000 entries per image (all layers, whiteouts included); the largest images seen have a few
  hundred thousand files.
- 64 GiB decompressed per image, `MICROPOD_MAX_IMAGE_SIZE` to change (docker's sizes: 100g, 512m).
- Extended (pax, GNU long name) headers of at most 1 MiB each. Global pax headers may carry only a
  comment (git archive writes one): Go's archive/tar, which docker and containerd use, applies none of
  their records to the files, while Python's tarfile would copy them into every member.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

from micropod.errors import RootfsError, UsageError
from micropod.units import binary_size, parse_size

PATH_MAX = 4096
MAX_DEPTH = 256
MAX_ENTRIES = 1_000_000
MAX_METADATA = 256 << 20
DEFAULT_MAX_IMAGE_SIZE = 64 << 30
MAX_EXTENDED_HEADER = 1 << 20
SIZE_ENV = "MICROPOD_MAX_IMAGE_SIZE"

_EXTENDED_TYPES = frozenset({tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                             tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK})
_GLOBAL_KEYS = frozenset({"comment", "hdrcharset"})
_NAME_KEYS = frozenset({"path", "linkpath"})  # the name and link target, counted once


@dataclass(frozen=True)
class ImageLimits:
    max_size: int = DEFAULT_MAX_IMAGE_SIZE  # decompressed bytes of all layers
    max_entries: int = MAX_ENTRIES
    max_depth: int = MAX_DEPTH
    path_max: int = PATH_MAX
    max_metadata: int = MAX_METADATA  # bytes of names, link targets and xattrs over the whole image

    @classmethod
    def from_env(cls) -> ImageLimits:
        text = os.environ.get(SIZE_ENV, "").strip()
        if not text:
            return cls()
        try:
            size = parse_size(text)
        except UsageError:
            raise UsageError(f"invalid {SIZE_ENV} {text!r}: use a size such as 64g or 500m") from None
        if size <= 0:
            raise UsageError(f"invalid {SIZE_ENV} {text!r}: must be more than 0")
        return cls(max_size=size)


class Budget:
    """What one flatten has used of its limits, shared by all the layers of the image."""

    def __init__(self, limits: ImageLimits) -> None:
        self.limits = limits
        self.read = 0
        self.entries = 0
        self.metadata = 0

    def count_bytes(self, n: int) -> None:
        self.read += n
        if self.read > self.limits.max_size:
            raise RootfsError(f"the image is larger than {binary_size(self.limits.max_size)} uncompressed "
                              f"(raise {SIZE_ENV} to allow it)")

    def count_entry(self, name: str, link: str, pax: Mapping[str, str]) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise RootfsError(f"the image has more than {self.limits.max_entries} entries")
        self.metadata += len(name) + len(link) + sum(len(k) + len(v) for k, v in pax.items()
                                                     if k not in _NAME_KEYS)
        if self.metadata > self.limits.max_metadata:
            raise RootfsError(f"the image's file names, link targets and attributes exceed "
                              f"{binary_size(self.limits.max_metadata)}")

    def check_path(self, path: str) -> str | None:
        """Why `path` (relative to the root) is refused, or None."""
        size = len(path.encode("utf-8", "surrogateescape")) + 1  # the leading "/"
        if size >= self.limits.path_max:  # and the terminating NUL must fit
            return f"is {size} bytes long, more than PATH_MAX ({self.limits.path_max}) allows"
        if path.count("/") >= self.limits.max_depth:
            return f"is deeper than {self.limits.max_depth} components"
        return None

    def check_link(self, target: str) -> str | None:
        size = len(target.encode("utf-8", "surrogateescape"))
        if size >= self.limits.path_max:
            return f"has a link target of {size} bytes, more than PATH_MAX ({self.limits.path_max}) allows"
        return None


class MeteredReader:
    """The decompressed stream of a layer, counted against the image's size bound as it is read."""

    def __init__(self, inner: IO[bytes], budget: Budget | None) -> None:
        self._inner = inner
        self._budget = budget

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        if self._budget is not None:
            self._budget.count_bytes(len(data))
        return data


class GuardedTarInfo(tarfile.TarInfo):
    """Refuses, before tarfile reads it into memory, an extended header over MAX_EXTENDED_HEADER."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Any:
        info = super().frombuf(buf, encoding, errors)
        if info.type in _EXTENDED_TYPES and info.size > MAX_EXTENDED_HEADER:
            raise RootfsError(f"a tar extended header of {info.size} bytes exceeds "
                              f"{binary_size(MAX_EXTENDED_HEADER)}")
        return info


def check_globals(tar: tarfile.TarFile) -> None:
    """Refuse global pax records other than a comment (see the module's docstring)."""
    extra = set(tar.pax_headers) - _GLOBAL_KEYS
    if extra:
        raise RootfsError(f"a global pax header sets {sorted(extra)[0]!r}, which docker ignores; "
                          f"refusing to apply it to every file")
