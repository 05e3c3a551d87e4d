"""Helpers for tests: build layer tars from small entry specs, wrap bytes as layers, read tar trees."""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard

from micropod import proc
from micropod.image.archive import LayoutWriter
from micropod.image.digest import VerifyingReader, sha256_digest
from micropod.image.model import OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD
from micropod.rootfs.flatten import flatten

MTIME = 1700000000


@dataclass(frozen=True)
class Entry:
    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    major: int = 0
    minor: int = 0
    xattrs: dict[str, str] = field(default_factory=dict, hash=False)


def f(name: str, data: bytes | str = b"", mode: int = 0o644, **kw: object) -> Entry:
    return Entry(name, tarfile.REGTYPE, data.encode() if isinstance(data, str) else data, mode, **kw)  # type: ignore[arg-type]


def d(name: str, mode: int = 0o755, **kw: object) -> Entry:
    return Entry(name, tarfile.DIRTYPE, mode=mode, **kw)  # type: ignore[arg-type]


def sym(name: str, target: str) -> Entry:
    return Entry(name, tarfile.SYMTYPE, mode=0o777, link=target)


def hard(name: str, target: str) -> Entry:
    return Entry(name, tarfile.LNKTYPE, link=target)


def wh(path: str) -> Entry:
    parent, _, base = path.rpartition("/")
    return f(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def opq(directory: str) -> Entry:
    return f(f"{directory}/.wh..wh..opq")


def layer_tar(entries: Iterable[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type, info.mode, info.uid, info.gid, info.mtime = e.kind, e.mode, e.uid, e.gid, MTIME
            info.linkname = e.link
            info.devmajor, info.devminor = e.major, e.minor
            info.size = len(e.data) if e.kind == tarfile.REGTYPE else 0
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items()}
            tar.addfile(info, io.BytesIO(e.data) if e.kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def compress(tar: bytes, how: str) -> tuple[bytes, str]:
    if how == "gzip":
        return gzip.compress(tar, mtime=0), OCI_LAYER_GZIP
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(tar), OCI_LAYER_ZSTD
    return tar, OCI_LAYER


@dataclass(frozen=True)
class MemLayer:
    blob: bytes
    media_type: str = OCI_LAYER
    claimed_digest: str | None = None

    @property
    def digest(self) -> str:
        return self.claimed_digest or sha256_digest(self.blob)

    @property
    def size(self) -> int:
        return len(self.blob)

    def open(self) -> BinaryIO:
        return io.BufferedReader(VerifyingReader(io.BytesIO(self.blob), self.digest, self.size))


def layers(*entry_lists: Sequence[Entry], how: str = "none") -> list[MemLayer]:
    return [MemLayer(*compress(layer_tar(entries), how)) for entries in entry_lists]


@dataclass(frozen=True)
class Node:
    kind: bytes
    mode: int
    uid: int
    gid: int
    data: bytes
    link: str
    dev: tuple[int, int]
    xattrs: dict[str, str] = field(hash=False)


def read_tree(data: bytes) -> dict[str, Node]:
    """path (no leading ./ or /) -> Node; hard links keep LNKTYPE and their target."""
    tree: dict[str, Node] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape") as tar:
        for m in tar:
            name = "/".join(p for p in m.name.split("/") if p not in ("", "."))
            content = tar.extractfile(m).read() if m.isreg() else b""  # type: ignore[union-attr]
            kind = tarfile.REGTYPE if m.isreg() else m.type
            xattrs = {k[len("SCHILY.xattr."):]: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            tree[name] = Node(kind, m.mode & 0o7777, m.uid, m.gid, content, m.linkname, (m.devmajor, m.devminor),
                              xattrs)
    return tree


def flatten_tree(*entry_lists: Sequence[Entry], how: str = "none") -> dict[str, Node]:
    out = io.BytesIO()
    flatten(layers(*entry_lists, how=how), out)
    return read_tree(out.getvalue())


def squash_tree(sqfs: Path) -> dict[str, Node]:
    """The tree inside a squashfs, through sqfs2tar (an independent reader)."""
    return read_tree(proc.run(["sqfs2tar", "--no-skip", sqfs]).stdout)


def oci_layout(dest: Path, layer_blobs: Sequence[tuple[bytes, str]], ref: str = "localhost/test:latest",
               config: dict[str, object] | None = None) -> str:
    """Write an OCI layout directory with one image; returns its manifest digest."""
    writer = LayoutWriter()
    diff_ids = []
    for blob, media_type in layer_blobs:
        raw = blob
        if media_type == OCI_LAYER_GZIP:
            raw = gzip.decompress(blob)
        elif media_type == OCI_LAYER_ZSTD:
            raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
        diff_ids.append(sha256_digest(raw))
    cfg: dict[str, object] = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                              "rootfs": {"type": "layers", "diff_ids": diff_ids}, **(config or {})}
    manifest = writer.add_image(cfg, layer_blobs, [ref] if ref else [])
    writer.write_dir(dest)
    return manifest.digest
