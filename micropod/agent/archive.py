"""`cp` inside the guest: tar streams of container paths, resolved within the container's root.

A path is resolved one component at a time, symlinks included, as if the root were ``/``: an absolute
link target starts again at the root. A ``..`` that a symlink would take above the root is refused
(``PathEscape``), as is a ``..`` of the requested path that climbs above it. ``tarfile`` is imported
only when a copy is made, to keep it off the agent's boot path.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import IO

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


def extract_tar(root: str, dest: str, source: IO[bytes], rename_top: str | None = None) -> None:
    """Unpack a tar stream into container directory ``dest``; each member's parent is resolved within
    the root, so no member lands outside it whatever links the tar or the container holds."""
    import shutil
    import tarfile

    with tarfile.open(fileobj=source, mode="r|") as tar:
        for member in tar:
            parts = _parts(member.name)
            if not parts or ".." in parts:
                raise ArchiveError(f"refusing the archive member {member.name!r}")
            if rename_top:
                parts[0] = rename_top
            parent = resolve(root, "/".join([dest, *parts[:-1]]))
            target = parent + "/" + parts[-1]
            if member.isdir():
                if not os.path.isdir(target):
                    if os.path.lexists(target):
                        os.unlink(target)
                    os.mkdir(target, 0o700)
                os.chmod(target, member.mode & 0o7777)
                continue
            if os.path.lexists(target) and (os.path.isdir(target) and not os.path.islink(target)):
                raise ArchiveError(f"cannot overwrite directory {'/'.join([dest, *parts])} with a non-directory")
            if os.path.lexists(target):
                os.unlink(target)
            if member.issym():
                os.symlink(member.linkname, target)
            elif member.islnk():
                link_parts = _parts(member.linkname)
                if rename_top and link_parts:
                    link_parts[0] = rename_top
                os.link(resolve(root, "/".join([dest, *link_parts]), follow_last=False), target)
            elif member.isfile():
                data = tar.extractfile(member)
                assert data is not None
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as file:
                    shutil.copyfileobj(data, file)
                os.chmod(target, member.mode & 0o7777)
            else:
                continue  # devices and fifos are not copied into a running container
            os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)
