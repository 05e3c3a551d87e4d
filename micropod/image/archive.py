"""Write OCI image layouts, as a directory or as a tar (an "OCI archive"), reproducibly.

LayoutWriter is for the demo image and tests: blobs in memory, small images. `save_archive` streams
images out of the store for `save`.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from micropod.fsutil import atomic_file, atomic_write
from micropod.image.digest import digest_hex, sha256_digest
from micropod.image.model import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYOUT_VERSION,
    OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    Descriptor,
    Manifest,
    Platform,
    canonical_json,
)

if TYPE_CHECKING:
    from micropod.image.store import ImageStore, StoredImage

# Fixed metadata so the same content always makes the same archive bytes.
ARCHIVE_MTIME = 0


@dataclass
class LayoutWriter:
    """Collects blobs and index entries, then writes them out as a layout directory or archive."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    entries: list[Descriptor] = field(default_factory=list)

    def add_blob(self, data: bytes, media_type: str) -> Descriptor:
        digest = sha256_digest(data)
        self.blobs[digest] = data
        return Descriptor(media_type, digest, len(data))

    def add_image(self, config: Mapping[str, object], layers: Sequence[tuple[bytes, str]],
                  ref_names: Sequence[str] = (), *, platform: Platform | None = None) -> Descriptor:
        """Add an image from its config JSON object and (blob, media type) layers; returns the manifest."""
        config_desc = self.add_blob(canonical_json(config), OCI_CONFIG)
        layer_descs = tuple(self.add_blob(data, media_type) for data, media_type in layers)
        manifest = self.add_blob(Manifest(config_desc, layer_descs).to_bytes(), OCI_MANIFEST)
        self.add_manifest(manifest, ref_names, platform=platform)
        return manifest

    def add_manifest(self, manifest: Descriptor, ref_names: Sequence[str] = (), *,
                     platform: Platform | None = None) -> None:
        names: Sequence[str | None] = ref_names or [None]
        for name in names:
            annotations = {REF_NAME_ANNOTATION: name} if name else {}
            self.entries.append(Descriptor(manifest.media_type, manifest.digest, manifest.size,
                                           annotations, platform))

    def _files(self) -> list[tuple[str, bytes]]:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [e.to_json() for e in self.entries]}
        files = [("oci-layout", canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION})),
                 ("index.json", json.dumps(index, indent=2, sort_keys=True).encode() + b"\n")]
        files += [(f"blobs/sha256/{digest_hex(d)}", data) for d, data in sorted(self.blobs.items())]
        return files

    def write_dir(self, dest: Path) -> Path:
        (dest / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        for name, data in self._files():
            atomic_write(dest / name, data)
        return dest

    def write_archive(self, out: Path) -> Path:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for directory in ("blobs", "blobs/sha256"):
                tar.addfile(_info(directory, tarfile.DIRTYPE, 0o755))
            for name, data in self._files():
                tar.addfile(_info(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
        atomic_write(out, buf.getvalue())
        return out


def _info(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.mtime = kind, mode, size, ARCHIVE_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def save_archive(store: ImageStore, images: Sequence[tuple[StoredImage, Sequence[str]]], out: Path) -> Path:
    """Write `images` from the store as an OCI archive at `out`, streaming blobs from the store (each
    verified as it is read); the archive appears only when complete."""
    blobs: dict[str, int] = {}
    entries: list[Descriptor] = []
    for image, names in images:
        manifest = store.read_manifest(image.manifest_digest)
        for desc in (manifest.config, *manifest.layers):
            blobs[desc.digest] = desc.size
        size = store.blob_path(image.manifest_digest).stat().st_size
        blobs[image.manifest_digest] = size
        for name in list[str | None](names) or [None]:
            annotations = {REF_NAME_ANNOTATION: name} if name else {}
            entries.append(Descriptor(image.manifest_media_type, image.manifest_digest, size, annotations,
                                      image.platform if image.platform.os else None))
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [e.to_json() for e in entries]}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out, mode=None) as f, tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("oci-layout", canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION})),
                           ("index.json", json.dumps(index, indent=2, sort_keys=True).encode() + b"\n")):
            tar.addfile(_info(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
        for directory in ("blobs", "blobs/sha256"):
            tar.addfile(_info(directory, tarfile.DIRTYPE, 0o755))
        for digest, size in sorted(blobs.items()):
            with store.open_blob(digest, size) as blob:
                tar.addfile(_info(f"blobs/sha256/{digest_hex(digest)}", tarfile.REGTYPE, 0o644, size), blob)
                blob.read(1)  # reach EOF, so the blob's digest is checked
    return out
