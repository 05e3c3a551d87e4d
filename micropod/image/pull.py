"""Pull an image from a registry into the store: manifest, then config, then layers concurrently.

Every blob streams through sha256 into a temp file in the store and is renamed into place only when
its digest matches (`ImageStore.ingest`); blobs already present are skipped. The whole pull holds the
store's `writing()` lock until the image is tagged, so a concurrent `gc` cannot take its blobs.
An interrupted pull leaves only complete, verified blobs; running it again fetches what is missing.
"""

from __future__ import annotations

import io
import json
import platform as _platform
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from micropod.errors import DigestMismatchError, ImageError, MicropodError, NotFoundError, RegistryError, UsageError
from micropod.image.credentials import CredentialSource
from micropod.image.digest import sha256_digest
from micropod.image.model import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_CONFIG_SIZE,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ImageConfig,
    Manifest,
    Platform,
    parse_index,
)
from micropod.image.reference import Reference, parse_reference
from micropod.image.registry import RegistryClient, RetryPolicy, TransferError
from micropod.image.store import ImageStore, StoredImage

if TYPE_CHECKING:
    from micropod.context import Context

DEFAULT_CONCURRENCY = 6
_BLOB_ATTEMPTS = 3
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm",
         "i686": "386", "s390x": "s390x", "ppc64le": "ppc64le", "riscv64": "riscv64"}


class PullProgress(Protocol):
    """What a pull reports, for progress bars; every method may be called from worker threads."""

    def blob_started(self, digest: str, size: int) -> None: ...

    def blob_advanced(self, digest: str, nbytes: int) -> None: ...

    def blob_done(self, digest: str, *, skipped: bool) -> None: ...


class _NoProgress:
    def blob_started(self, digest: str, size: int) -> None:
        pass

    def blob_advanced(self, digest: str, nbytes: int) -> None:
        pass

    def blob_done(self, digest: str, *, skipped: bool) -> None:
        pass


@dataclass(frozen=True)
class PullOptions:
    platform: Platform | None = None
    tls_verify: bool = True
    insecure_registries: frozenset[str] = frozenset()
    concurrency: int = DEFAULT_CONCURRENCY
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(frozen=True)
class PullResult:
    image: StoredImage
    reference: Reference
    downloaded: int  # blobs fetched
    skipped: int  # blobs already present


def host_platform() -> Platform:
    machine = _platform.machine()
    arch = _ARCH.get(machine, machine)
    return Platform(arch, "linux", "v8" if arch == "arm64" else None)


def parse_platform(text: str) -> Platform:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UsageError(f"invalid platform {text!r}: expected os/arch[/variant]")
    return Platform(parts[1], parts[0], parts[2] if len(parts) == 3 else None)


def select_platform(entries: Sequence[Descriptor], wanted: Platform, what: str) -> Descriptor:
    """The index entry for `wanted`; a variant is matched when asked for (arm64 treats none as v8)."""
    def variant(p: Platform) -> str | None:
        return p.variant or ("v8" if p.architecture == "arm64" else None)

    candidates = [e for e in entries if e.platform is not None and e.media_type in MANIFEST_TYPES
                  and e.platform.os == wanted.os and e.platform.architecture == wanted.architecture]
    exact = [e for e in candidates if e.platform and variant(e.platform) == variant(wanted)]
    if exact:
        return exact[0]
    if candidates and wanted.variant is None:
        return candidates[0]
    available = sorted({str(e.platform) for e in entries if e.platform is not None})
    raise ImageError(f"{what} has no image for platform {wanted}; available: "
                     f"{', '.join(available) if available else 'none declared'}")


class _Cancelled(RegistryError):
    """Another layer failed or the user interrupted: this download stops (its temp file goes)."""


class Puller:
    def __init__(self, store: ImageStore, credentials: CredentialSource | None, options: PullOptions,
                 progress: PullProgress | None = None) -> None:
        self.store = store
        self.credentials = credentials
        self.options = options
        self.progress = progress or _NoProgress()
        self._lock = threading.Lock()
        self._cancel = threading.Event()

    def pull(self, text: str) -> PullResult:
        ref = parse_reference(text)
        creds = self.credentials.get(ref.domain) if self.credentials else None
        insecure = ref.domain in self.options.insecure_registries
        with RegistryClient(ref.domain, credentials=creds, tls_verify=self.options.tls_verify, insecure=insecure,
                            retry=self.options.retry, max_connections=self.options.concurrency + 2) as client, \
                self.store.writing():
            digest, manifest = self._manifest(client, ref)
            counts = [0, 0]
            self._blob(client, ref, manifest.config.check_size(MAX_CONFIG_SIZE, "config"), counts)
            ImageConfig.from_bytes(self.store.read_blob(manifest.config.digest, manifest.config.size),
                                   f"config {manifest.config.digest}")  # refuse a malformed config early
            workers = max(1, min(self.options.concurrency, len(manifest.layers)))
            self._layers(client, ref, manifest.layers, counts, workers)
            self.store.add_images([(digest, [ref] if ref.tag else [])])
            image = self.store.get(digest)
        return PullResult(image, ref, downloaded=counts[0], skipped=counts[1])

    def _layers(self, client: RegistryClient, ref: Reference, layers: Sequence[Descriptor], counts: list[int],
                workers: int) -> None:
        """Fetch layers concurrently; the first failure (or Ctrl-C) cancels the rest at their next chunk,
        so the error comes at once and no download is left running."""
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pull")
        futures = [pool.submit(self._blob, client, ref, layer, counts) for layer in layers]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in futures:
                error = future.exception() if future in done else None
                if error is not None:
                    raise error
        except BaseException:
            self._cancel.set()
            for future in futures:
                future.cancel()
            raise
        finally:
            pool.shutdown(wait=True)

    def _manifest(self, client: RegistryClient, ref: Reference) -> tuple[str, Manifest]:
        """The image manifest for the wanted platform, verified and stored; (its digest, it)."""
        reference = ref.digest or ref.tag or "latest"
        name = str(ref)
        for _ in range(2):  # an index, then the manifest it points to
            body, media_type, header_digest = client.get_manifest(ref.path, reference)
            if not media_type or media_type in ("application/json", "text/plain", "application/octet-stream"):
                media_type = _body_media_type(body, name)
            digest = sha256_digest(body)
            expected = reference if reference.startswith("sha256:") else header_digest
            if expected and expected.startswith("sha256:") and expected != digest:
                raise DigestMismatchError(f"manifest {name} does not match its digest {expected} (got {digest})")
            if media_type in INDEX_TYPES:
                entries = parse_index(body, f"index {name}")
                chosen = select_platform(entries, self.options.platform or host_platform(), f"image {name}")
                reference = chosen.digest
                continue
            if media_type not in MANIFEST_TYPES:
                raise ImageError(f"{name}: unsupported manifest media type {media_type!r}")
            manifest = Manifest.from_bytes(body, f"manifest {name}")
            if manifest.media_type != media_type and "mediaType" in body.decode(errors="replace"):
                raise ImageError(f"{name}: manifest media type {manifest.media_type!r} does not match "
                                 f"the registry's Content-Type {media_type!r}")
            self.store.ingest(io.BytesIO(body), digest, len(body))
            return digest, manifest
        raise ImageError(f"{name}: an image index points to another index; nested indexes are not supported")

    def _advanced(self, digest: str, nbytes: int) -> None:
        if self._cancel.is_set():
            raise _Cancelled(f"download of blob {digest} cancelled")
        self.progress.blob_advanced(digest, nbytes)

    def _blob(self, client: RegistryClient, ref: Reference, desc: Descriptor, counts: list[int]) -> None:
        if self.store.has_blob(desc.digest):
            with self._lock:
                counts[1] += 1
            self.progress.blob_done(desc.digest, skipped=True)
            return
        self.progress.blob_started(desc.digest, desc.size)
        for attempt in range(_BLOB_ATTEMPTS):
            try:
                with client.open_blob(ref.path, desc.digest) as reader:
                    reader.on_read = lambda n: self._advanced(desc.digest, n)
                    self.store.ingest(reader, desc.digest, desc.size)  # type: ignore[arg-type]
                break
            except (TransferError, DigestMismatchError) as exc:
                truncated = isinstance(exc, TransferError) or "truncated" in str(exc)
                if attempt == _BLOB_ATTEMPTS - 1 or not truncated:
                    if isinstance(exc, DigestMismatchError):
                        raise
                    raise RegistryError(f"{ref.domain}: download of blob {desc.digest} failed after "
                                        f"{_BLOB_ATTEMPTS} attempts: {exc or type(exc).__name__}") from exc
                self.progress.blob_started(desc.digest, desc.size)
        with self._lock:
            counts[0] += 1
        self.progress.blob_done(desc.digest, skipped=False)


def _body_media_type(body: bytes, name: str) -> str:
    try:
        obj = json.loads(body)
    except ValueError as exc:
        raise ImageError(f"{name}: the registry sent a manifest that is not JSON") from exc
    media_type = obj.get("mediaType") if isinstance(obj, dict) else None
    if isinstance(media_type, str):
        return media_type
    if isinstance(obj, dict) and "manifests" in obj:
        return OCI_INDEX
    return OCI_MANIFEST


def pull(store: ImageStore, text: str, *, credentials: CredentialSource | None = None,
         options: PullOptions | None = None, progress: PullProgress | None = None) -> PullResult:
    return Puller(store, credentials, options or PullOptions(), progress).pull(text)


def pull_missing(ctx: Context, name: str) -> StoredImage:
    """`run` of an image not in the store: pull it (a name, never an image id), then use it."""
    from micropod.image.credentials import CredentialStore, insecure_registries
    from micropod.image.store import _ID_PREFIX

    if _ID_PREFIX.match(name):
        raise NotFoundError(f"No such image: {name}")
    parse_reference(name)
    options = PullOptions(insecure_registries=insecure_registries(ctx.root.path / "registries.json"))
    try:
        result = pull(ctx.images, name, credentials=CredentialStore(ctx.root.path / "auth.json"), options=options)
    except MicropodError as exc:
        raise NotFoundError(f"No such image: {name}", hint=f"pulling it failed: {exc}") from exc
    print(f"Image '{name}' was not in the store: pulled {result.reference} ({result.image.manifest_digest})",
          file=sys.stderr, flush=True)
    return result.image
