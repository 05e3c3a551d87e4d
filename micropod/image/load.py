"""`micropod load`: images from an OCI layout directory, an OCI archive, or a `docker save` tar.

Every blob is streamed into the store and verified against its digest (and docker-save layers
against the config's diff_ids). The index is updated once, at the end, so a failed load adds no
image: at most some verified, unreferenced blobs that the next `gc()` removes. Nothing is extracted:
archive members are read by name, and names that try to leave the archive are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol

from micropod.errors import DigestMismatchError, ImageError, MicropodError, NotFoundError
from micropod.image import compression
from micropod.image.digest import check_digest, digest_hex, sha256_digest
from micropod.image.model import (
    CONTAINERD_NAME_ANNOTATION,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_CONFIG_SIZE,
    MAX_MANIFEST_SIZE,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    REF_NAME_ANNOTATION,
    Descriptor,
    ImageConfig,
    Manifest,
    parse_index,
    parse_json_object,
)
from micropod.image.reference import Reference, parse_reference
from micropod.image.store import ImageStore, StoredImage

log = logging.getLogger("micropod")

_LAYER_TYPES = {compression.NONE: OCI_LAYER, compression.GZIP: OCI_LAYER_GZIP,
                compression.ZSTD: OCI_LAYER_ZSTD}
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
_HEX_FILE = re.compile(r"(?:^|/)(?:sha256/)?([0-9a-f]{64})(?:\.json)?$")


class _Source(Protocol):
    """Files of the thing being loaded, by their relative names."""

    def exists(self, name: str) -> bool: ...

    def open(self, name: str) -> IO[bytes]: ...

    def close(self) -> None: ...


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _clean(name: str, source: Path) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts or name.startswith("/"):
        raise ImageError(f"{source}: refusing the path {name!r}, which leaves the image")
    return "/".join(parts)


class _DirSource:
    def __init__(self, root: Path) -> None:
        self.root = root

    def exists(self, name: str) -> bool:
        return (self.root / _clean(name, self.root)).is_file()

    def open(self, name: str) -> IO[bytes]:
        try:
            return (self.root / _clean(name, self.root)).open("rb")
        except OSError as exc:
            raise ImageError(f"{self.root}: cannot read {name}: {exc.strerror}") from exc

    def close(self) -> None:
        pass


class _TarSource:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            # r:* also accepts `docker save | gzip` (or bzip2, xz).
            self.tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by close()
            self.members = {_clean(m.name, path): m for m in self.tar.getmembers()}
        except tarfile.ReadError as exc:
            raise ImageError(f"{path} is not a tar archive (plain, gzip, bzip2 or xz)") from exc
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise ImageError(f"{path} is not a readable tar archive: {_one_line(exc)}") from exc

    def exists(self, name: str) -> bool:
        return _clean(name, self.path) in self.members

    def open(self, name: str) -> IO[bytes]:
        member = self.members.get(_clean(name, self.path))
        try:
            # extractfile follows symlinks and hard links inside the archive only (docker save links
            # identical layers); it never touches the host's filesystem.
            data = self.tar.extractfile(member) if member is not None else None
        except (KeyError, tarfile.TarError) as exc:
            raise ImageError(f"{self.path}: {name} is a link to a missing member") from exc
        if data is None:
            raise ImageError(f"{self.path}: {name} is missing or not a file")
        return data

    def close(self) -> None:
        self.tar.close()


class _Opened:
    def __init__(self, source: Path) -> None:
        self.path = source

    def __enter__(self) -> _Source:
        if self.path.is_dir():
            self.src: _Source = _DirSource(self.path)
        elif self.path.is_file():
            self.src = _TarSource(self.path)
        else:
            raise NotFoundError(f"{self.path}: no such file or directory")
        return self.src

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.src.close()


def _read(src: _Source, name: str, limit: int = 64 << 20) -> bytes:
    with src.open(name) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ImageError(f"{name} is larger than the {limit >> 20} MiB image metadata may have")
    return data


def _blob_name(digest: str) -> str:
    return f"blobs/sha256/{digest_hex(digest)}"


def host_platform() -> tuple[str, str]:
    machine = platform.machine()
    return "linux", _ARCH.get(machine, machine)


def load_image(store: ImageStore, source: Path) -> list[StoredImage]:
    """Load every image in `source` into `store`; return them as stored."""
    with _Opened(source) as src, store.writing():
        try:
            if src.exists("oci-layout") and src.exists("index.json"):
                planned = _load_oci(store, src, source)
            elif src.exists("manifest.json"):
                planned = _load_docker(store, src, source)
            else:
                raise ImageError(f"{source} is neither an OCI image layout or archive nor a docker save archive")
        except (OSError, EOFError, tarfile.TarError) as exc:
            raise ImageError(f"{source}: cannot read the archive: {_one_line(exc)}") from exc
        if not planned:
            raise ImageError(f"{source} holds no images")
        store.add_images(planned)
    return [store.get(digest) for digest, _ in planned]


# -- OCI layouts ---------------------------------------------------------------------------------------

def _load_oci(store: ImageStore, src: _Source, source: Path) -> list[tuple[str, Sequence[Reference]]]:
    layout = parse_json_object(_read(src, "oci-layout"), f"{source}: oci-layout")
    if not str(layout.get("imageLayoutVersion", "")).startswith("1."):
        raise ImageError(f"{source}: unsupported OCI layout version {layout.get('imageLayoutVersion')!r}")
    entries = parse_index(_read(src, "index.json"), f"{source}: index.json")
    docker_tags = _docker_repo_tags(src, source) if src.exists("manifest.json") else {}
    planned: dict[str, list[Reference]] = {}
    for entry in entries:
        manifest_desc = _pick_manifest(store, src, entry, source)
        manifest = _ingest_manifest(store, src, manifest_desc, source)
        refs = planned.setdefault(manifest_desc.digest, [])
        names = [_entry_name(entry), *docker_tags.get(manifest.config.digest, [])]
        refs.extend(r for r in names if r is not None and r not in refs)
    return list(planned.items())


def _entry_name(entry: Descriptor) -> Reference | None:
    """The full name an index entry gives, if any. A bare `ref.name` such as "latest" is only a tag
    (as skopeo writes it) and names no repository, so such an image loads untagged."""
    for key in (CONTAINERD_NAME_ANNOTATION, REF_NAME_ANNOTATION):
        name = entry.annotations.get(key)
        if name and any(c in name for c in "/:"):
            try:
                return parse_reference(name)
            except MicropodError:
                log.warning("ignoring index entry name %r: not a valid reference", name)
    return None


def _pick_manifest(store: ImageStore, src: _Source, desc: Descriptor, source: Path) -> Descriptor:
    """Follow image indexes down to the manifest for this host's platform."""
    os_, arch = host_platform()
    for _ in range(8):
        if desc.media_type in MANIFEST_TYPES:
            return desc
        if desc.media_type not in INDEX_TYPES:
            raise ImageError(f"{source}: index entry {desc.digest} has unsupported type {desc.media_type}")
        children = parse_index(_ingest_bytes(store, src, desc.check_size(MAX_MANIFEST_SIZE, "index")),
                               f"{source}: index {desc.digest}")
        fits = [c for c in children if c.platform is None or
                (c.platform.os == os_ and c.platform.architecture == arch)]
        if not fits:
            offered = ", ".join(sorted(str(c.platform) for c in children if c.platform)) or "none"
            raise ImageError(f"{source}: no image for {os_}/{arch} (it has: {offered})")
        desc = fits[0]
    raise ImageError(f"{source}: image indexes nest too deeply")


def _ingest(store: ImageStore, src: _Source, desc: Descriptor) -> None:
    if store.has_blob(desc.digest):
        return
    name = _blob_name(desc.digest)
    if not src.exists(name):
        raise ImageError(f"blob {desc.digest} is missing from the image being loaded")
    with src.open(name) as f:
        store.ingest(f, desc.digest, desc.size)


def _ingest_bytes(store: ImageStore, src: _Source, desc: Descriptor) -> bytes:
    _ingest(store, src, desc)
    return store.read_blob(desc.digest, desc.size)


def _ingest_manifest(store: ImageStore, src: _Source, desc: Descriptor, source: Path) -> Manifest:
    manifest = Manifest.from_bytes(_ingest_bytes(store, src, desc.check_size(MAX_MANIFEST_SIZE, "manifest")),
                                   f"{source}: manifest {desc.digest}")
    config = manifest.config.check_size(MAX_CONFIG_SIZE, "config")
    ImageConfig.from_bytes(_ingest_bytes(store, src, config), f"config {config.digest}")
    for layer in manifest.layers:
        _ingest(store, src, layer)
    return manifest


# -- docker save ---------------------------------------------------------------------------------------

def _docker_manifest(src: _Source, source: Path) -> list[dict[str, Any]]:
    try:
        entries = json.loads(_read(src, "manifest.json"))
    except ValueError as exc:
        raise ImageError(f"{source}: manifest.json is not valid JSON: {exc}") from exc
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ImageError(f"{source}: manifest.json is not a list of images")
    return entries


def _repo_tags(entry: dict[str, Any], source: Path) -> list[Reference]:
    tags = entry.get("RepoTags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ImageError(f"{source}: RepoTags must be a list of strings")
    return [parse_reference(t) for t in tags]


def _docker_repo_tags(src: _Source, source: Path) -> dict[str, list[Reference]]:
    """config digest -> RepoTags, to name OCI entries of a docker 25+ save that carry no full name."""
    out: dict[str, list[Reference]] = {}
    for entry in _docker_manifest(src, source):
        match = _HEX_FILE.search(str(entry.get("Config", "")))
        if match:
            out.setdefault(f"sha256:{match.group(1)}", []).extend(_repo_tags(entry, source))
    return out


def _load_docker(store: ImageStore, src: _Source, source: Path) -> list[tuple[str, Sequence[Reference]]]:
    planned: list[tuple[str, Sequence[Reference]]] = []
    for entry in _docker_manifest(src, source):
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list) or \
                not all(isinstance(n, str) for n in layer_names):
            raise ImageError(f"{source}: manifest.json entry needs Config and Layers")
        refs = _repo_tags(entry, source)
        config_bytes = _read(src, config_name, MAX_CONFIG_SIZE)
        config_digest = sha256_digest(config_bytes)
        named = _HEX_FILE.search(config_name)
        if named and named.group(1) != digest_hex(config_digest):
            raise DigestMismatchError(f"config {config_name} does not match its digest (got {config_digest})")
        config = ImageConfig.from_bytes(config_bytes, f"{source}: {config_name}")
        if len(config.diff_ids) != len(layer_names):
            raise ImageError(f"{source}: {config_name} lists {len(config.diff_ids)} layers, "
                             f"manifest.json {len(layer_names)}")
        layers = tuple(_ingest_docker_layer(store, src, name, diff_id)
                       for name, diff_id in zip(layer_names, config.diff_ids, strict=True))
        config_desc = store.put_blob(config_bytes, OCI_CONFIG)
        manifest = store.put_blob(Manifest(config_desc, layers).to_bytes())
        planned.append((manifest.digest, refs))
    return planned


def _ingest_docker_layer(store: ImageStore, src: _Source, name: str, diff_id: str) -> Descriptor:
    with src.open(name) as f:
        digest = store.ingest(f)
    size = store.blob_path(digest).stat().st_size
    with store.open_blob(digest, size) as blob:
        kind = compression.detect(blob.peek(6)[:6])
        if kind not in _LAYER_TYPES:
            raise ImageError(f"layer {name} is {kind}-compressed, which OCI images cannot carry")
        actual = digest if kind == compression.NONE else _uncompressed_digest(blob, name)
    if actual != check_digest(diff_id):
        raise DigestMismatchError(f"layer {name} does not match its diff_id {diff_id} (got {actual})")
    return Descriptor(_LAYER_TYPES[kind], digest, size)


def _uncompressed_digest(blob: Any, name: str) -> str:
    hasher = hashlib.sha256()
    try:
        stream = compression.decompressed(blob)
        while chunk := stream.read(1 << 20):
            hasher.update(chunk)
    except compression.DECOMPRESSION_ERRORS as exc:
        raise ImageError(f"layer {name} does not decompress: {exc}") from exc
    return "sha256:" + hasher.hexdigest()
