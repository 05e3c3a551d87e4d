"""`cp` inside the guest: tar streams of container paths, resolved within the container's root.

A path is resolved one component at a time, symlinks included, as if the root were ``/``: an absolute
link target starts again at the root. A ``..`` that a symlink would take above the root is refused
(``ArchiveError``), as is a ``..`` of the requested path that climbs above it. What the host sends is
unpacked by micropod/agent/beneath.py beneath an fd of the destination, following no link the
container planted. ``tarfile`` and the unpacker are imported only when a copy is made, to keep them
off the agent's boot path.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import IO

    from micropod.agent.beneath import Untar

_MAX_LINKS = 40


class ArchiveError(Exception):
    """A copy that cannot be made; the message is for the user."""


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def resolve(root: str, path: str, follow_last: bool = True) -> str:
    """The real path of container path ``path`` under ``root``, never outside it."""
    pending = _parts(path)
    resolved: list[str] = []
    links = 0
    from_link = 0  # how many of the pending components came from symlink targets
    while pending:
        name = pending.pop(0)
        via_link = from_link > 0
        from_link = max(0, from_link - 1)
        if name == "..":
            if not resolved:
                if via_link:
                    raise ArchiveError(f"{path}: a symbolic link points outside the container")
                continue
            resolved.pop()
            continue
        candidate = root + "/" + "/".join([*resolved, name])
        if os.path.islink(candidate) and (pending or follow_last):
            links += 1
            if links > _MAX_LINKS:
                raise ArchiveError(f"{path}: too many levels of symbolic links")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            extra = _parts(target)
            pending = extra + pending
            from_link = len(extra) + from_link
            continue
        resolved.append(name)
    return root + ("/" + "/".join(resolved) if resolved else "")


class FrameWriter:
    """A write-only file that hands each chunk to ``send``."""

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self.send = send
        self.written = 0

    def write(self, data: bytes) -> int:
        if data:
            self.send(bytes(data))
            self.written += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def write_tar(root: str, path: str, out: FrameWriter) -> None:
    """Stream a tar of ``path`` (itself as the top entry, named by its last component)."""
    import tarfile

    real = resolve(root, path)
    if not os.path.lexists(real):
        raise ArchiveError(f"Could not find the file {path} in container")
    name = os.path.basename(path.rstrip("/")) or "."
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        tar.add(real, arcname=name, recursive=True)


def open_dir(root: str, path: str) -> int:
    """An fd of container directory ``path``, resolved as the container sees it and then opened from
    an fd of the root following no link: a link the container swaps in meanwhile fails, never leads out."""
    from micropod.agent.beneath import TarError, open_beneath

    real = resolve(root, path)
    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return open_beneath(rootfd, _parts(real[len(root):]))
    except TarError as exc:
        raise ArchiveError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ArchiveError(f"{path}: {exc.strerror}") from None
    finally:
        os.close(rootfd)


def upload(root: str, dest: str, rename_top: str | None = None) -> Untar:
    """A tar stream to feed, unpacked into container directory ``dest`` by the rules of beneath.py;
    its owners are the tar's (the host packs root's unless ``cp -a``). Close it with ``finish``."""
    from micropod.agent.beneath import Untar

    return Untar(open_dir(root, dest), rename_top, keep_owner=True)


def finish(untar: Untar) -> None:
    """End an upload: raise its first error as an ``ArchiveError``, and release its directory."""
    from micropod.agent.beneath import TarError

    try:
        untar.close()
    except TarError as exc:
        raise ArchiveError(str(exc)) from None
    finally:
        untar.extractor.abort()
        os.close(untar.extractor.dirfd)


def extract_tar(root: str, dest: str, source: IO[bytes], rename_top: str | None = None) -> None:
    """Unpack all of a tar stream read from ``source`` into container directory ``dest``."""
    untar = upload(root, dest, rename_top)
    try:
        while chunk := source.read(1 << 16):
            untar.feed(chunk)
    finally:
        finish(untar)
