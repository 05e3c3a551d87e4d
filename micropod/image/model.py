"""The plain data of an image: descriptors, manifests, configs, and the small Image/Layer interfaces.

Parsing is strict about what micropod relies on (digests, sizes, media types) and lenient about the
rest, so images built by any tool load.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from micropod.errors import ImageError
from micropod.image.digest import check_digest

OCI_LAYOUT_VERSION = "1.0.0"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

# What is read into memory is bounded as containers/image (Podman, CRI-O, skopeo) bounds it: 4 MiB for a
# manifest or an index, 4 MiB for a config. Layers stream and are bounded by micropod.rootfs.limits.
MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 4 << 20

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
# Non-distributable ("foreign") layers are still tar layers; micropod has them locally or not at all.
LAYER_TYPES = frozenset({
    OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, DOCKER_LAYER_GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
})


def _str_dict(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in value.items()):
        raise ImageError(f"{what} must be an object of strings")
    return dict(value)


def _str_tuple(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageError(f"{what} must be a list of strings")
    return tuple(value)


def parse_json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ImageError(f"{what} is not a JSON object")
    return obj


def canonical_json(obj: Any) -> bytes:
    """Stable bytes for JSON micropod writes, so the digests of what it writes are reproducible."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Platform:
    architecture: str
    os: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Platform:
        arch, os_ = obj.get("architecture"), obj.get("os")
        variant = obj.get("variant")
        if not isinstance(arch, str) or not isinstance(os_, str):
            raise ImageError("platform needs architecture and os")
        return cls(arch, os_, variant if isinstance(variant, str) and variant else None)

    def to_json(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict, hash=False)
    platform: Platform | None = None

    @classmethod
    def from_json(cls, obj: Any, what: str = "descriptor") -> Descriptor:
        if not isinstance(obj, dict):
            raise ImageError(f"{what} is not a JSON object")
        media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
        if not isinstance(media_type, str) or not isinstance(digest, str):
            raise ImageError(f"{what} needs mediaType and digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{what} {digest} has an invalid size")
        platform = obj.get("platform")
        return cls(
            media_type=media_type,
            digest=check_digest(digest),
            size=size,
            annotations=_str_dict(obj.get("annotations"), f"{what} annotations"),
            platform=Platform.from_json(platform) if isinstance(platform, dict) else None,
        )

    def check_size(self, limit: int, what: str) -> Descriptor:
        """This descriptor, unless it declares more than `limit` bytes for JSON that is read into memory."""
        if self.size > limit:
            raise ImageError(f"{what} {self.digest} declares {self.size} bytes, more than the "
                             f"{limit >> 20} MiB allowed")
        return self

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = self.platform.to_json()
        return out


@dataclass(frozen=True)
class Manifest:
    """One image: a config and its layers, bottom first."""

    config: Descriptor
    layers: tuple[Descriptor, ...]
    media_type: str = OCI_MANIFEST
    annotations: dict[str, str] = field(default_factory=dict, hash=False)

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "manifest") -> Manifest:
        obj = parse_json_object(data, what)
        media_type = obj.get("mediaType", OCI_MANIFEST)
        if media_type in INDEX_TYPES or "manifests" in obj:
            raise ImageError(f"{what} is an image index, not an image manifest")
        if media_type not in MANIFEST_TYPES or obj.get("schemaVersion") != 2:
            raise ImageError(f"{what} has unsupported media type {media_type!r}")
        layers = obj.get("layers")
        if not isinstance(layers, list):
            raise ImageError(f"{what} has no layer list")
        descs = tuple(Descriptor.from_json(layer, f"{what} layer") for layer in layers)
        for desc in descs:
            if desc.media_type not in LAYER_TYPES:
                raise ImageError(f"{what}: layer {desc.digest} has unsupported media type {desc.media_type}")
        return cls(
            config=Descriptor.from_json(obj.get("config"), f"{what} config"),
            layers=descs,
            media_type=media_type,
            annotations=_str_dict(obj.get("annotations"), f"{what} annotations"),
        )

    def to_bytes(self) -> bytes:
        obj: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "config": self.config.to_json(),
            "layers": [layer.to_json() for layer in self.layers],
        }
        if self.annotations:
            obj["annotations"] = dict(self.annotations)
        return canonical_json(obj)


def parse_index(data: bytes, what: str = "index") -> tuple[Descriptor, ...]:
    obj = parse_json_object(data, what)
    manifests = obj.get("manifests")
    if obj.get("schemaVersion") != 2 or not isinstance(manifests, list):
        raise ImageError(f"{what} is not an OCI image index")
    return tuple(Descriptor.from_json(m, f"{what} entry") for m in manifests)


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config that decide how its container runs."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    stop_signal: str | None = None
    exposed_ports: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    architecture: str = ""
    os: str = ""
    variant: str | None = None
    created: str | None = None
    diff_ids: tuple[str, ...] = ()

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "image config") -> ImageConfig:
        obj = parse_json_object(data, what)
        run = obj.get("config") or {}
        if not isinstance(run, dict):
            raise ImageError(f"{what}: 'config' is not an object")
        rootfs = obj.get("rootfs") or {}
        ports = run.get("ExposedPorts") or {}
        if not isinstance(ports, dict) or not isinstance(rootfs, dict):
            raise ImageError(f"{what}: malformed ExposedPorts or rootfs")
        working_dir, user, stop = run.get("WorkingDir") or "", run.get("User") or "", run.get("StopSignal")
        arch, os_, variant, created = (obj.get(k) for k in ("architecture", "os", "variant", "created"))
        if not all(isinstance(v, str) for v in (working_dir, user)):
            raise ImageError(f"{what}: WorkingDir and User must be strings")
        return cls(
            entrypoint=_str_tuple(run.get("Entrypoint"), f"{what}: Entrypoint"),
            cmd=_str_tuple(run.get("Cmd"), f"{what}: Cmd"),
            env=_str_tuple(run.get("Env"), f"{what}: Env"),
            working_dir=working_dir,
            user=user,
            stop_signal=stop if isinstance(stop, str) and stop else None,
            exposed_ports=tuple(sorted(str(p) for p in ports)),
            labels=_str_dict(run.get("Labels"), f"{what}: Labels"),
            architecture=arch if isinstance(arch, str) else "",
            os=os_ if isinstance(os_, str) else "",
            variant=variant if isinstance(variant, str) and variant else None,
            created=created if isinstance(created, str) else None,
            diff_ids=tuple(check_digest(d) for d in _str_tuple(rootfs.get("diff_ids"), f"{what}: diff_ids")),
        )

    @property
    def platform(self) -> Platform:
        return Platform(self.architecture, self.os, self.variant)


class Layer(Protocol):
    """One layer blob. `open()` streams the compressed bytes and verifies the digest at EOF."""

    @property
    def digest(self) -> str: ...

    @property
    def media_type(self) -> str: ...

    @property
    def size(self) -> int: ...

    def open(self) -> BinaryIO: ...


class Image(Protocol):
    """An image whose config is already parsed; its layers are handles that do no I/O until opened."""

    @property
    def config(self) -> ImageConfig: ...

    def layers(self) -> Sequence[Layer]: ...
