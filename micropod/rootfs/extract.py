"""Write an image's flattened tree into a host directory (`image unpack --to DIR`), for comparing with
other tools. The flattened stream is already sanitised (no `..`, no absolute names); on top of that,
every entry's real parent path is checked to stay inside DIR before it is written, so a symlink in the
tree is never followed out of it. Ownership, modes (setuid too), devices and xattrs are kept, as umoci
does when run as root.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import threading
from pathlib import Path

from micropod.errors import RootfsError
from micropod.image.model import Image
from micropod.rootfs.flatten import FlattenStats, flatten_image

_XATTR = "SCHILY.xattr."


def _inside(root: str, path: str) -> bool:
    real = os.path.realpath(path)
    return real == root or real.startswith(root + os.sep)


def extract_image(image: Image, dest: Path) -> FlattenStats:
    """Flatten `image` into `dest` (created if missing; must be empty)."""
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise RootfsError(f"{dest} is not empty")
    root = os.path.realpath(dest)
    xattrs: list[tuple[str, dict[str, str]]] = []

    def check(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        target = os.path.join(root, member.name)
        if not _inside(root, os.path.dirname(target)):
            raise RootfsError(f"entry {member.name!r} would be written outside {dest}")
        if member.islnk() and not _inside(root, os.path.join(root, member.linkname)):
            raise RootfsError(f"hard link {member.name!r} points outside {dest}")
        if member.islnk():  # a hard link shares its target's inode: its own header must not re-chmod it
            return member.replace(mode=None, uid=None, gid=None, uname=None, gname=None, mtime=None,  # type: ignore[arg-type]
                                  deep=False)
        attrs = {k[len(_XATTR):]: v for k, v in member.pax_headers.items() if k.startswith(_XATTR)}
        if attrs and not member.issym():
            xattrs.append((target, attrs))
        return member

    read_fd, write_fd = os.pipe()
    result: list[FlattenStats] = []
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with os.fdopen(write_fd, "wb", buffering=1 << 20) as out:
                result.append(flatten_image(image, out))
        except BaseException as exc:
            failure.append(exc)

    producer = threading.Thread(target=produce, name="flatten", daemon=True)
    producer.start()
    try:
        with os.fdopen(read_fd, "rb", buffering=1 << 20) as stream, \
                tarfile.open(fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape") as tar:
            tar.extractall(root, numeric_owner=True, filter=check)
            while stream.read(1 << 20):
                pass
    except (OSError, tarfile.TarError) as exc:
        producer.join()
        if failure:
            raise failure[0] from exc
        raise RootfsError(f"cannot write the image tree into {dest}: {exc}") from exc
    producer.join()
    if failure:
        raise failure[0]
    for path, attrs in xattrs:
        for name, value in attrs.items():
            with contextlib.suppress(OSError):
                os.setxattr(path, name, value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
    return result[0]

