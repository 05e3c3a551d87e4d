"""Pull an image from a registry into the store: manifest, then config, then layers concurrently.

Every blob streams through sha256 into a temp file in the store and is renamed into place only when
its digest matches (`ImageStore.ingest`); blobs already present are skipped. The whole pull holds the
store's `writing()` lock until the image is tagged, so a concurrent `gc` cannot take its blobs.
An interrupted pull leaves only complete, verified blobs; running it again fetches what is missing.

Mirrors (micropod.image.settings) come first, in order, then the registry: the manifest is resolved from
the first that serves it; a blob from that one, else from the next ones. A mirror is untrusted: its
content goes through the same checks, and the image is stored under its own name.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import platform as _platform
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

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
from micropod.image.settings import FILENAME, mirror_endpoint, registry_settings
from micropod.image.store import ImageStore, StoredImage

if TYPE_CHECKING:
    from micropod.context import Context

log = logging.getLogger("micropod")

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
    mirrors: Mapping[str, Sequence[str]] = field(default_factory=dict)  # registry domain -> mirror base URLs

    @classmethod
    def of_root(cls, root: Path, **fields: Any) -> PullOptions:
        """The options that the state root's registries.json sets (insecure registries, mirrors), and
        ``fields``: every pull (`pull`, `run`, the CRI's PullImage) reads the file this one way."""
        settings = registry_settings(root / FILENAME)
        return cls(insecure_registries=settings.insecure, mirrors=settings.mirrors, **fields)


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


# What makes a pull try the next endpoint: unreachable, refused, missing, 5xx, or content that fails checks.
_FALL_THROUGH = (RegistryError, NotFoundError, ImageError)


class Puller:
    def __init__(self, store: ImageStore, credentials: CredentialSource | None, options: PullOptions,
                 progress: PullProgress | None = None) -> None:
        self.store = store
        self.credentials = credentials
        self.options = options
        self.progress = progress or _NoProgress()
        self._lock = threading.Lock()
        self._cancel = threading.Event()

    def _clients(self, ref: Reference) -> list[RegistryClient]:
        """The endpoints to try, in order: the registry's mirrors, then the registry itself."""
        mirrors = self.options.mirrors
        client_for = functools.partial(RegistryClient, tls_verify=self.options.tls_verify, retry=self.options.retry,
                                       max_connections=self.options.concurrency + 2)
        clients = []
        for url in mirrors.get(ref.domain, ()):
            endpoint = mirror_endpoint(url)  # explicit options get the file's checks too
            client = client_for(f"mirror {endpoint}", endpoint=endpoint)
            client.credentials = self.credentials.get(client.host) if self.credentials else None  # the mirror's
            clients.append(client)
        creds = self.credentials.get(ref.domain) if self.credentials else None
        insecure = ref.domain in self.options.insecure_registries
        clients.append(client_for(ref.domain, credentials=creds, insecure=insecure))
        return clients

    def pull(self, text: str) -> PullResult:
        ref = parse_reference(text)
        clients = self._clients(ref)
        with contextlib.ExitStack() as stack, self.store.writing():
            for client in clients:
                stack.enter_context(client)
            sources, digest, manifest = self._resolve(clients, ref)
            counts = [0, 0]
            self._blob(sources, ref, manifest.config.check_size(MAX_CONFIG_SIZE, "config"), counts)
            ImageConfig.from_bytes(self.store.read_blob(manifest.config.digest, manifest.config.size),
                                   f"config {manifest.config.digest}")  # refuse a malformed config early
            workers = max(1, min(self.options.concurrency, len(manifest.layers)))
            self._layers(sources, ref, manifest.layers, counts, workers)
            self.store.add_images([(digest, [ref] if ref.tag else [])])
            image = self.store.get(digest)
        return PullResult(image, ref, downloaded=counts[0], skipped=counts[1])

    def _resolve(self, clients: Sequence[RegistryClient], ref: Reference
                 ) -> tuple[Sequence[RegistryClient], str, Manifest]:
        """The manifest from the first endpoint that serves one that passes the checks; (that endpoint and
        the ones after it, the manifest's digest, it). When all fail, the registry's own error, with what
        the mirrors said as its hint."""
        failed: list[str] = []
        for index, client in enumerate(clients):
            try:
                return clients[index:], *self._manifest(client, ref)
            except _FALL_THROUGH as exc:
                _fell_through(exc, client, clients[index + 1:], failed)
        raise AssertionError("unreachable")  # pragma: no cover

    def _layers(self, clients: Sequence[RegistryClient], ref: Reference, layers: Sequence[Descriptor],
                counts: list[int], workers: int) -> None:
        """Fetch layers concurrently; the first failure (or Ctrl-C) cancels the rest at their next chunk,
        so the error comes at once and no download is left running."""
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pull")
        futures = [pool.submit(self._blob, clients, ref, layer, counts) for layer in layers]
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

    def _blob(self, clients: Sequence[RegistryClient], ref: Reference, desc: Descriptor, counts: list[int]) -> None:
        if self.store.has_blob(desc.digest):
            with self._lock:
                counts[1] += 1
            self.progress.blob_done(desc.digest, skipped=True)
            return
        failed: list[str] = []
        for index, client in enumerate(clients):
            self.progress.blob_started(desc.digest, desc.size)
            try:
                self._fetch(client, ref, desc)
                break
            except _Cancelled:
                raise
            except _FALL_THROUGH as exc:
                _fell_through(exc, client, clients[index + 1:], failed)
        with self._lock:
            counts[0] += 1
        self.progress.blob_done(desc.digest, skipped=False)

    def _fetch(self, client: RegistryClient, ref: Reference, desc: Descriptor) -> None:
        """One blob from one endpoint into the store, verified; a truncated transfer is tried again."""
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
                    raise RegistryError(f"{client.domain}: download of blob {desc.digest} failed after "
                                        f"{_BLOB_ATTEMPTS} attempts: {exc or type(exc).__name__}") from exc
                self.progress.blob_started(desc.digest, desc.size)


def _fell_through(exc: MicropodError, client: RegistryClient, rest: Sequence[RegistryClient],
                  failed: list[str]) -> None:
    """Note `client`'s failure and return when there is an endpoint left to try; else raise the last
    endpoint's error, what the ones before it said as its hint."""
    if not rest:
        if failed:
            exc.hint = "; ".join([*([exc.hint] if exc.hint else []), "tried first: " + "; ".join(failed)])
        raise exc
    log.info("%s; trying %s", exc, rest[0].domain)
    failed.append(exc.message if exc.message.startswith(client.domain) else f"{client.domain}: {exc.message}")


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
    from micropod.image.credentials import CredentialStore
    from micropod.image.store import _ID_PREFIX

    if _ID_PREFIX.match(name):
        raise NotFoundError(f"No such image: {name}")
    parse_reference(name)
    options = PullOptions.of_root(ctx.root.path)  # a bad file is its own error, not "No such image"
    try:
        result = pull(ctx.images, name, credentials=CredentialStore(ctx.root.path / "auth.json"), options=options)
    except MicropodError as exc:
        raise NotFoundError(f"No such image: {name}", hint=f"pulling it failed: {exc}") from exc
    print(f"Image '{name}' was not in the store: pulled {result.reference} ({result.image.manifest_digest})",
          file=sys.stderr, flush=True)
    return result.image
