"""Named volumes and bind mounts in the guest. A volume is an ext4 disk the host attached, a bind a host
directory shared over virtio-9p; each is mounted under /run/micropod-{volumes,binds}/<container>/<n> and
bound onto its path in the container's root before the container starts, so that the runtime's recursive
bind of the root carries it into the container's mount namespace.

A volume's first use fills it from the image's content at that path, as docker's do; an ext4's own
lost+found goes, so the container sees an empty directory as it would under docker.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from micropod import syscalls
from micropod.runtime.rootfs import beneath, copy_tree

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

VOLUME_BASE = "/run/micropod-volumes"
BIND_BASE = "/run/micropod-binds"
# 9p2000.L with the largest message QEMU's virtio transport takes, and no guest page cache: the host's
# directory may change under the guest at any time.
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000,cache=none"
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class VolumeError(Exception):
    pass


def _is_disk(device: object) -> bool:
    """A virtio disk, or a SCSI disk hot-added to a pod's VM (micropod/agent/hotdisk.py)."""
    return isinstance(device, str) and device.startswith(("/dev/vd", "/dev/sd")) and device[5:].isalnum()


def _is_tag(tag: object) -> bool:
    return isinstance(tag, str) and tag.isascii() and tag.isalnum() and len(tag) <= 31


def _checked(entry: Any, field: str, source_key: str, source_ok: Any) -> tuple[str, str, bool]:
    """(source, target, read_only) of one volume or bind the host asked for, every field checked."""
    if not isinstance(entry, dict):
        raise VolumeError(f"{field}: not an object")
    source, target, read_only = entry.get(source_key), entry.get("target"), entry.get("read_only", False)
    if not isinstance(source, str) or not source_ok(source):
        raise VolumeError(f"{field}.{source_key}: {source!r} is not one")
    if not isinstance(target, str) or not target.startswith("/") or target.rstrip("/") == "":
        raise VolumeError(f"{field}.target: {target!r} is not an absolute path below /")
    if not isinstance(read_only, bool):
        raise VolumeError(f"{field}.read_only: not a boolean")
    return source, target, read_only


def mount_volumes(cid: str, root: str, volumes: list[Any], mounted: list[str]) -> None:
    """Mount each volume (an ext4 disk) and bind it at its target beneath ``root``, filling a new one from
    the image; each mount is appended to ``mounted``."""
    for index, volume in enumerate(volumes):
        device, target, read_only = _checked(volume, f"volumes[{index}]", "device", _is_disk)
        _mount_at(f"{VOLUME_BASE}/{cid}/{index}", (device, "ext4", None), root, target, read_only,
                  f"volumes[{index}]", mounted)


def mount_binds(cid: str, root: str, binds: list[Any], mounted: list[str]) -> None:
    """Mount each host directory share (virtio-9p) and bind it at its target beneath ``root``. A bind with a
    ``subpath`` is an entry of the pod's one shared directory (the host bound a host path there when the
    container was made), a directory or a file."""
    for index, bind in enumerate(binds):
        field = f"binds[{index}]"
        tag, target, read_only = _checked(bind, field, "tag", _is_tag)
        subpath = bind.get("subpath")
        if subpath is None:
            _mount_at(f"{BIND_BASE}/{cid}/{index}", (tag, "9p", NINEP_OPTIONS), root, target, read_only, field,
                      mounted, fill=False)
            continue
        if not isinstance(subpath, str) or not _is_entry(subpath):
            raise VolumeError(f"{field}.subpath: {subpath!r} is not an entry's name")
        source = f"{_pod_share(tag)}/{subpath}"
        inside = _mount_point(root, target, field)
        if stat.S_ISDIR(os.lstat(source).st_mode):
            _make_directory(inside)
        else:
            _make_file(inside)
        syscalls.mount(source, str(inside), None, syscalls.MS_BIND)
        mounted.append(str(inside))
        if read_only:
            syscalls.mount(None, str(inside), None, syscalls.MS_BIND | syscalls.MS_REMOUNT | syscalls.MS_RDONLY
                           | syscalls.MS_NOSUID | syscalls.MS_NODEV)


def _is_entry(name: str) -> bool:
    return 0 < len(name) <= 64 and name.isascii() and name.replace("-", "").isalnum()


def _pod_share(tag: str) -> str:
    """The pod's shared directory, mounted once for all its containers (and kept while the VM runs)."""
    where = f"{BIND_BASE}/pod-{tag}"
    if not os.path.ismount(where):
        os.makedirs(where, 0o700, exist_ok=True)
        syscalls.mount(tag, where, "9p", syscalls.MS_NOSUID | syscalls.MS_NODEV, NINEP_OPTIONS)
    return where


def _make_file(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        _make_directory(path.parent)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
        return
    if not stat.S_ISREG(st.st_mode):
        raise VolumeError(f"cannot mount a file on {path}: it exists in the image and is not a regular file")


def _mount_at(where: str, filesystem: tuple[str, str, str | None], root: str, target: str, read_only: bool,
              field: str, mounted: list[str], fill: bool = True) -> None:
    source, fstype, data = filesystem
    os.makedirs(where, 0o700, exist_ok=True)
    flags = syscalls.MS_NOSUID | syscalls.MS_NODEV | (syscalls.MS_RDONLY if read_only else 0)
    syscalls.mount(source, where, fstype, flags, data)
    mounted.append(where)
    inside = _mount_point(root, target, field)
    if fill and not read_only:
        _fill_on_first_use(where, inside)
    _make_directory(inside)
    syscalls.mount(where, str(inside), None, syscalls.MS_BIND)
    mounted.append(str(inside))


def _mount_point(root: str, target: str, field: str) -> Path:
    """``target`` beneath the container's root, the image's links resolved as if the root were /; never the
    root itself nor a place of the kernel's filesystems, wherever the image's links point."""
    inside = beneath(Path(root), target)
    relative = inside.relative_to(root).parts
    if not relative or relative[0] in ("proc", "sys", "dev"):
        raise VolumeError(f"{field}.target: {target} resolves to /{'/'.join(relative)} in the image, "
                          "where no volume may go")
    return inside


def _fill_on_first_use(where: str, image_path: Path) -> None:
    """A volume that holds nothing yet gets what the image has at its path; a fill that fails is undone,
    so that the next use tries again rather than taking half a copy for the volume's content."""
    entries = os.listdir(where)
    if entries not in ([], ["lost+found"]):
        return
    if entries:
        os.rmdir(f"{where}/lost+found")
    try:
        st = os.lstat(image_path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    source = os.open(image_path, _DIRECTORY)
    target = os.open(where, _DIRECTORY)
    try:
        copy_tree(source, target)
        os.fchown(target, st.st_uid, st.st_gid)
        os.fchmod(target, stat.S_IMODE(st.st_mode))
    except BaseException:
        _empty(where)
        raise
    finally:
        os.close(source)
        os.close(target)


def _empty(directory: str) -> None:
    for name in os.listdir(directory):
        path = f"{directory}/{name}"
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


def _make_directory(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.makedirs(path, 0o755, exist_ok=True)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise VolumeError(f"cannot mount a volume on {path}: it exists in the image and is not a directory")
