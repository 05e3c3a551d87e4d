"""The image store: docker's images, references and ids over an OCI image layout (micropod.image.layout).

Index entries carry the full normalised reference in org.opencontainers.image.ref.name, one entry per
reference; an entry without one is a dangling image, docker's <none>.

Writers of blobs hold gc.lock shared (`writing()`) until the image that needs them is tagged, so a
concurrent `gc()` (which holds it exclusively) never deletes a blob between its ingest and its tag.
index.json changes happen under an exclusive lock on index.json.lock and are written atomically.
"""

from __future__ import annotations

import builtins
import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from micropod.errors import ConflictError, ImageError, NotFoundError, UsageError
from micropod.fsutil import flock
from micropod.image.digest import check_digest, digest_hex
from micropod.image.layout import CHUNK, OciLayout
from micropod.image.model import (
    INDEX_TYPES,
    OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    Descriptor,
    ImageConfig,
    Layer,
    Manifest,
    Platform,
    parse_index,
    parse_json_object,
)
from micropod.image.reference import OFFICIAL_REPO_PREFIX, Reference, has_explicit_domain, parse_reference

_ID_PREFIX = re.compile(r"^(?:sha256:)?([0-9a-f]{4,64})$")


@dataclass(frozen=True)
class StoredImage:
    refs: tuple[str, ...]
    manifest_digest: str
    config_digest: str
    config: ImageConfig
    layers: tuple[Descriptor, ...]
    size: int
    manifest_media_type: str = OCI_MANIFEST

    @property
    def id(self) -> str:
        """docker's image id: the hex of the config digest."""
        return digest_hex(self.config_digest)

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def created(self) -> str | None:
        return self.config.created

    @property
    def platform(self) -> Platform:
        return self.config.platform


@dataclass(frozen=True)
class RemoveResult:
    """What `remove` did, in docker's terms: references untagged, and the image id if it was deleted."""

    untagged: tuple[str, ...]
    deleted: str | None

    def __iter__(self) -> Iterator[str]:
        """docker rmi's output lines."""
        yield from (f"Untagged: {ref}" for ref in self.untagged)
        if self.deleted:
            yield f"Deleted: {self.deleted}"


@dataclass(frozen=True)
class StoreLayer:
    """A layer blob in the store; opening it streams the file and verifies its digest."""

    store: ImageStore
    descriptor: Descriptor

    @property
    def digest(self) -> str:
        return self.descriptor.digest

    @property
    def media_type(self) -> str:
        return self.descriptor.media_type

    @property
    def size(self) -> int:
        return self.descriptor.size

    def open(self) -> BinaryIO:
        return self.store.open_blob(self.digest, self.size)


@dataclass(frozen=True)
class StoreImage:
    """`Image` over a StoredImage: config already parsed, layers as lazy handles."""

    store: ImageStore
    stored: StoredImage

    @property
    def config(self) -> ImageConfig:
        return self.stored.config

    def layers(self) -> Sequence[Layer]:
        return [StoreLayer(self.store, d) for d in self.stored.layers]


def _ref_name(entry: Descriptor) -> str | None:
    return entry.annotations.get(REF_NAME_ANNOTATION)


class ImageStore(OciLayout):
    # -- references -----------------------------------------------------------------------------------

    def read_manifest(self, digest: str) -> Manifest:
        return Manifest.from_bytes(self.read_blob(digest), f"manifest {digest}")

    def _check_complete(self, manifest_digest: str) -> Descriptor:
        """The index entry for a manifest whose blobs are all present (the index never dangles)."""
        if not self.has_blob(manifest_digest):
            raise NotFoundError(f"manifest {manifest_digest} is missing from the image store")
        manifest = self.read_manifest(manifest_digest)
        for desc in (manifest.config, *manifest.layers):
            if not self.has_blob(desc.digest):
                raise NotFoundError(f"blob {desc.digest} of manifest {manifest_digest} is missing")
        config = ImageConfig.from_bytes(self.read_blob(manifest.config.digest, manifest.config.size))
        platform = config.platform if config.architecture and config.os else None
        size = self.blob_path(manifest_digest).stat().st_size
        return Descriptor(manifest.media_type, manifest_digest, size, platform=platform)

    def add_images(self, images: Sequence[tuple[str, Sequence[Reference | str]]]) -> None:
        """Record manifests with their references in one index update. A reference that named
        another image moves here; that image stays as a dangling entry if nothing else names it."""
        planned: list[tuple[Descriptor, list[str]]] = []
        for manifest_digest, refs in images:
            names = [str(self._taggable(r)) for r in refs]
            planned.append((self._check_complete(check_digest(manifest_digest)), names))

        def change(entries: list[Descriptor]) -> list[Descriptor]:
            for base, names in planned:
                for name in names:
                    entries = self._drop_ref(entries, name)
                entries = [e for e in entries if not (e.digest == base.digest and _ref_name(e) is None)]
                if names:
                    entries += [Descriptor(base.media_type, base.digest, base.size,
                                           {REF_NAME_ANNOTATION: n}, base.platform) for n in names]
                elif not any(e.digest == base.digest for e in entries):
                    entries.append(base)
            return entries

        self._update_index(change)

    @staticmethod
    def _drop_ref(entries: list[Descriptor], name: str) -> list[Descriptor]:
        kept: list[Descriptor] = []
        orphaned: list[Descriptor] = []
        for e in entries:
            (orphaned if _ref_name(e) == name else kept).append(e)
        for e in orphaned:
            if not any(k.digest == e.digest for k in kept):
                kept.append(Descriptor(e.media_type, e.digest, e.size, platform=e.platform))
        return kept

    @staticmethod
    def _taggable(ref: Reference | str) -> Reference:
        parsed = parse_reference(ref) if isinstance(ref, str) else ref
        if parsed.digest is not None or parsed.tag is None:
            raise UsageError(f"cannot tag {parsed}: a tag reference needs a tag and no digest")
        return parsed

    def tag(self, ref: Reference | str, manifest_digest: str) -> None:
        self.add_images([(manifest_digest, [ref])])

    def untag(self, ref: Reference | str) -> str:
        """Remove one reference and return the manifest digest it named; an image left without a
        reference leaves the index (its blobs go at the next `gc()`)."""
        name = str(self._taggable(ref))
        found: list[str] = []

        def change(entries: list[Descriptor]) -> list[Descriptor]:
            found.extend(e.digest for e in entries if _ref_name(e) == name)
            return [e for e in entries if _ref_name(e) != name and not
                    (e.digest in found and _ref_name(e) is None)]

        self._update_index(change)
        if not found:
            raise NotFoundError(f"No such image: {name}")
        return found[0]

    # -- images ---------------------------------------------------------------------------------------

    def _groups(self) -> dict[str, list[str]]:
        """manifest digest -> its references, in index order."""
        groups: dict[str, list[str]] = {}
        for entry in self._read_index():
            if entry.media_type in INDEX_TYPES:
                continue
            refs = groups.setdefault(entry.digest, [])
            name = _ref_name(entry)
            if name is not None and name not in refs:
                refs.append(name)
        return groups

    def _stored(self, manifest_digest: str, refs: Sequence[str]) -> StoredImage:
        manifest = self.read_manifest(manifest_digest)
        config = ImageConfig.from_bytes(
            self.read_blob(manifest.config.digest, manifest.config.size), f"config {manifest.config.digest}")
        return StoredImage(
            refs=tuple(refs),
            manifest_digest=manifest_digest,
            config_digest=manifest.config.digest,
            config=config,
            layers=manifest.layers,
            size=manifest.config.size + sum(layer.size for layer in manifest.layers),
            manifest_media_type=manifest.media_type,
        )

    def get(self, manifest_digest: str) -> StoredImage:
        """The image with this manifest digest, if the index holds it."""
        refs = self._groups().get(check_digest(manifest_digest))
        if refs is None:
            raise NotFoundError(f"No such image: {manifest_digest}")
        return self._stored(manifest_digest, refs)

    def list(self) -> list[StoredImage]:
        return [self._stored(digest, refs) for digest, refs in self._groups().items()]

    def image(self, stored: StoredImage) -> StoreImage:
        return StoreImage(self, stored)

    def resolve(self, name_or_id: str) -> StoredImage:
        return self._resolve(name_or_id)[0]

    def _resolve(self, text: str) -> tuple[StoredImage, str | None]:
        """The image `text` names, and the reference that matched (None when matched by id)."""
        if not _ID_PREFIX.match(text):
            parse_reference(text)  # a malformed name is a usage error, not a missing image
        groups = self._groups()
        for candidate in _candidates(text):
            for digest, refs in groups.items():
                if candidate.digest is not None:
                    if digest == candidate.digest and any(
                            parse_reference(r).repository == candidate.repository for r in refs):
                        return self._stored(digest, refs), None
                elif str(candidate) in refs:
                    return self._stored(digest, refs), str(candidate)
        match = _ID_PREFIX.match(text)
        if match:
            prefix = match.group(1)
            images = (self._stored(d, r) for d, r in groups.items())
            hits = [img for img in images if img.id.startswith(prefix)]
            ids = {img.id for img in hits}
            if len(ids) > 1:
                raise UsageError(f"image id prefix {prefix!r} is ambiguous: it matches {len(ids)} images")
            if hits:
                return hits[0], None
        raise NotFoundError(f"No such image: {text}")

    def remove(self, name_or_id: str, *, force: bool = False) -> RemoveResult:
        """docker rmi: a reference is untagged; an id (or the last reference) removes the image."""
        image, matched_ref = self._resolve(name_or_id)
        if matched_ref is not None and len(image.refs) > 1:
            self.untag(matched_ref)
            return RemoveResult((matched_ref,), None)
        if matched_ref is None and len(image.refs) > 1 and not force:
            raise ConflictError(f"unable to delete {image.short_id} (must be forced) - image is referenced "
                                f"in multiple repositories")
        same_id = {i.manifest_digest for i in self.list() if i.config_digest == image.config_digest}

        def change(entries: list[Descriptor]) -> list[Descriptor]:
            return [e for e in entries if e.digest not in same_id]

        self._update_index(change)
        return RemoveResult(image.refs, image.config_digest)

    def gc(self) -> int:
        """Delete blobs no index entry reaches, and leftover temp files; return how many blobs went."""
        self.init()
        removed = 0
        with flock(self.path / "gc.lock"), flock(self.path / "index.json.lock"):
            reachable: set[str] = set()
            for entry in self._read_index():
                self._mark(entry.digest, entry.media_type, reachable)
            for blob in self._blobs.iterdir():
                if "sha256:" + blob.name not in reachable:
                    blob.unlink()
                    removed += 1
            # Writers hold gc.lock shared while they have temp files, so none is live now.
            for tmp in self._ingest_dir.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        return removed

    def check(self) -> builtins.list[str]:
        """Verify every blob against its digest and every indexed image for completeness; one line
        per problem found (empty when the store is consistent)."""
        self.init()
        problems: builtins.list[str] = []
        for blob in sorted(self._blobs.iterdir()):
            digest = "sha256:" + blob.name
            try:
                with self.open_blob(digest) as reader:
                    while reader.read(CHUNK):
                        pass
            except (ImageError, NotFoundError) as exc:
                problems.append(f"corrupt blob {digest}: {exc}")
            except OSError as exc:
                problems.append(f"unreadable blob {digest}: {exc}")
        for digest, refs in self._groups().items():
            try:
                self._check_complete(digest)
            except (ImageError, NotFoundError) as exc:
                problems.append(f"image {', '.join(refs) or digest}: {exc}")
        return problems

    def _mark(self, digest: str, media_type: str, reachable: set[str]) -> None:
        if digest in reachable or not self.has_blob(digest):
            return
        reachable.add(digest)
        if media_type in INDEX_TYPES:
            for child in parse_index(self.read_blob(digest), f"index {digest}"):
                self._mark(child.digest, child.media_type, reachable)
            return
        obj = parse_json_object(self.read_blob(digest), f"manifest {digest}")
        config = obj.get("config")
        entries: list[object] = [config] if isinstance(config, dict) else []
        entries += [layer for layer in obj.get("layers") or [] if isinstance(layer, dict)]
        for entry in entries:
            reachable.add(Descriptor.from_json(entry, f"manifest {digest} entry").digest)


def _candidates(text: str) -> list[Reference]:
    """References a user's name may mean: as given, then under localhost/ for a short name."""
    try:
        ref = parse_reference(text)
    except UsageError:
        return []
    if has_explicit_domain(text):
        return [ref]
    # "hello" is docker.io/library/hello but localhost/hello, not localhost/library/hello.
    path = ref.path if "/" in text else ref.path.removeprefix(OFFICIAL_REPO_PREFIX)
    return [ref, Reference("localhost", path, ref.tag, ref.digest)]
