"""Build the read-only squashfs base of an image, once per image, shared by every VM that runs it.

The flattened tar goes straight into tar2sqfs (squashfs-tools-ng): no root, no extraction on the host.
The result is cached as rootfs/<config digest>.sqfs; a build writes a temp file and renames it into
place under a per-image lock, so concurrent runs build once and nobody sees a partial file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import tempfile
from pathlib import Path

from micropod import proc
from micropod.errors import CommandError, RootfsError
from micropod.fsutil import PRIVATE_FILE, flock, fsync_dir, private_dir
from micropod.image.model import Image
from micropod.image.store import ImageStore, StoredImage
from micropod.paths import StateRoot
from micropod.rootfs.flatten import FlattenStats, flatten_image

# zstd at a low level packs about as fast as lz4 and much smaller than it, and reads fast in the guest
# (needs CONFIG_SQUASHFS_ZSTD). See the measurements in the README's design section.
COMPRESSOR = "zstd"
COMPRESSOR_OPTIONS = "level=3"
BUILD_TIMEOUT = 3600.0
PIPE_SIZE = 1 << 20


def tar2sqfs_argv(dest: Path, *, compressor: str = COMPRESSOR,
                  options: str | None = COMPRESSOR_OPTIONS) -> list[str | Path]:
    argv: list[str | Path] = [
        "tar2sqfs",
        "--quiet",
        "--no-skip",  # a record it cannot read is an error, not a silently missing file
        "--force",  # the temp file exists already (mkstemp); it is ours
        "--compressor", compressor,
        "--num-jobs", str(os.cpu_count() or 1),
        "--defaults", "uid=0,gid=0,mode=0755,mtime=0",  # directories that no layer lists
    ]
    if options:
        argv += ["--comp-extra", options]
    return [*argv, dest]


def build_squashfs(image: Image, dest: Path, *, compressor: str = COMPRESSOR,
                   options: str | None = COMPRESSOR_OPTIONS) -> FlattenStats:
    """Flatten `image` into a squashfs at `dest` (overwritten). On failure `dest` may hold garbage:
    callers write to a temp file."""
    with tempfile.TemporaryFile() as errors:
        child = proc.spawn(tar2sqfs_argv(dest, compressor=compressor, options=options),
                           stdin=subprocess.PIPE, stdout=errors, stderr=errors)
        assert child.stdin is not None
        with contextlib.suppress(OSError, AttributeError):  # fewer wake-ups of both sides; Linux only
            fcntl.fcntl(child.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        try:
            try:
                stats = flatten_image(image, child.stdin)
                child.stdin.close()
            except BrokenPipeError:
                stats = None
            rc = child.wait(timeout=BUILD_TIMEOUT)
        except BaseException:
            child.kill()
            child.wait()
            raise
        finally:
            with contextlib.suppress(BrokenPipeError):
                child.stdin.close()
        if rc != 0 or stats is None:
            errors.seek(0)
            tail = proc.stderr_tail(errors.read())
            raise CommandError(f"tar2sqfs failed with exit code {rc}: {tail or 'no output'}")
    return stats


def ensure_rootfs(root: StateRoot, store: ImageStore, image: StoredImage) -> Path:
    """The squashfs base of `image`, built now if it is not cached yet."""
    dest = root.rootfs(image.id)
    if dest.exists():
        return dest
    for d in (root.rootfs_dir, root.tmp):
        private_dir(d)
    with flock(root.rootfs_dir / f".{image.id}.lock"):
        if dest.exists():  # another process built it while we waited
            return dest
        fd, tmp_name = tempfile.mkstemp(dir=root.tmp, prefix=f"rootfs-{image.short_id}-", suffix=".sqfs")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            build_squashfs(store.image(image), tmp)
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            tmp.chmod(PRIVATE_FILE)
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        except CommandError as exc:
            raise RootfsError(f"cannot build the root filesystem of image {image.short_id}: {exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return dest
