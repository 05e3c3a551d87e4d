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


def _checked(volume: Any, index: int) -> tuple[str, str, bool]:
    if not isinstance(volume, dict):
        raise VolumeError(f"volumes[{index}]: not an object")
    device, target, read_only = volume.get("device"), volume.get("target"), volume.get("read_only", False)
    if not isinstance(device, str) or not device.startswith("/dev/vd") or "/" in device[5:]:
        raise VolumeError(f"volumes[{index}].device: {device!r} is not a virtio disk")
    if not isinstance(target, str) or not target.startswith("/") or target.rstrip("/") == "":
        raise VolumeError(f"volumes[{index}].target: {target!r} is not an absolute path below /")
    if not isinstance(read_only, bool):
        raise VolumeError(f"volumes[{index}].read_only: not a boolean")
    return device, target, read_only


def mount_binds(cid: str, root: str, binds: list[Any], mounted: list[str]) -> None:
    """Mount each host directory share and bind it at its target beneath ``root``."""
    for index, bind in enumerate(binds):
        tag, target, read_only = _checked_bind(bind, index)
        where = f"{BIND_BASE}/{cid}/{index}"
        os.makedirs(where, 0o700, exist_ok=True)
        flags = syscalls.MS_NOSUID | syscalls.MS_NODEV | (syscalls.MS_RDONLY if read_only else 0)
        syscalls.mount(tag, where, "9p", flags, NINEP_OPTIONS)
        mounted.append(where)
        inside = _mount_point(root, target, f"binds[{index}]")
        _make_directory(inside)
        syscalls.mount(where, str(inside), None, syscalls.MS_BIND)
        mounted.append(str(inside))


def _checked_bind(bind: Any, index: int) -> tuple[str, str, bool]:
    if not isinstance(bind, dict):
        raise VolumeError(f"binds[{index}]: not an object")
    tag, target, read_only = bind.get("tag"), bind.get("target"), bind.get("read_only", False)
    if not isinstance(tag, str) or not tag.isascii() or not tag.isalnum() or len(tag) > 31:
        raise VolumeError(f"binds[{index}].tag: {tag!r} is not a mount tag")
    if not isinstance(target, str) or not target.startswith("/") or target.rstrip("/") == "":
        raise VolumeError(f"binds[{index}].target: {target!r} is not an absolute path below /")
    if not isinstance(read_only, bool):
        raise VolumeError(f"binds[{index}].read_only: not a boolean")
    return tag, target, read_only


def mount_volumes(cid: str, root: str, volumes: list[Any], mounted: list[str]) -> None:
    """Mount each volume and bind it at its target beneath ``root``; each mount is appended to ``mounted``."""
    for index, volume in enumerate(volumes):
        device, target, read_only = _checked(volume, index)
        where = f"{VOLUME_BASE}/{cid}/{index}"
        os.makedirs(where, 0o700, exist_ok=True)
        flags = syscalls.MS_NOSUID | syscalls.MS_NODEV | (syscalls.MS_RDONLY if read_only else 0)
        syscalls.mount(device, where, "ext4", flags)
        mounted.append(where)
        inside = _mount_point(root, target, f"volumes[{index}]")
        if not read_only:
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
