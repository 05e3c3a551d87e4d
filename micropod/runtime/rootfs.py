"""The container's filesystem, set up by its init in the new mount namespace, as runc's rootfs_linux.go does.

The rootfs belongs to the image, so it is hostile: every destination is resolved beneath the rootfs with its
symlinks read as if the rootfs were ``/`` (``beneath``), never followed out of it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from micropod import syscalls as sc
from micropod.errors import OciRuntimeError
from micropod.runtime.spec_mounts import MOUNT_OPTIONS, MountOptions, parse_mount_options

MAX_LINKS = 255

# runc's default devices, created in a /dev that is not the host's own.
DEFAULT_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("tty", 5, 0), ("random", 1, 8),
                   ("urandom", 1, 9))
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
             ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"))


def beneath(root: Path, path: str) -> Path:
    """``path`` inside ``root`` with every symlink resolved as if ``root`` were ``/`` (securejoin's rule)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        try:
            st = candidate.lstat()
        except FileNotFoundError:
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_LINKS:
                raise OciRuntimeError(f"too many symlinks resolving {path} in the rootfs")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def _make_target(dest: Path, is_dir: bool) -> None:
    if is_dir:
        dest.mkdir(parents=True, exist_ok=True)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        os.close(os.open(dest, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o755))


def _propagate(dest: str, opts: MountOptions) -> None:
    for flag in opts.propagation:
        sc.mount(None, dest, None, flag)


@dataclass
class RootfsSetup:
    rootfs: Path
    config: Mapping[str, Any]
    new_netns: bool
    in_userns: bool
    new_cgroupns: bool
    cgroup_paths: Mapping[str, str]  # Cgroup.paths(): v1 controller -> the container's directory, or {"": dir}

    def prepare(self) -> None:
        """Private (or as asked) propagation, the rootfs a mount point of its own, then each mount."""
        linux = self.config.get("linux") or {}
        chosen = MOUNT_OPTIONS.get(str(linux.get("rootfsPropagation") or ""))
        propagation = chosen.value if chosen and chosen.kind == "propagation" else sc.MS_SLAVE | sc.MS_REC
        sc.mount(None, "/", None, propagation)
        if propagation not in (sc.MS_SLAVE | sc.MS_REC, sc.MS_PRIVATE | sc.MS_REC):
            _make_parent_private(self.rootfs)  # after rslave or rprivate no mount is shared: no need to look
        sc.mount(str(self.rootfs), str(self.rootfs), None, sc.MS_BIND | sc.MS_REC)
        dev_bound = False
        for index, mount in enumerate(self.config.get("mounts") or []):
            dest = str(mount.get("destination", ""))
            if dest.rstrip("/") == "/dev" and "bind" in "".join(mount.get("options") or []):
                dev_bound = True
            try:
                self.mount_one(mount)
            except OSError as exc:
                raise OciRuntimeError(f"mounts[{index}] ({dest}): {exc.strerror or exc}") from None
        if not dev_bound:
            self.make_devices(linux.get("devices") or [])

    def mount_one(self, mount: Mapping[str, Any]) -> None:
        kind = str(mount.get("type") or "")
        source = str(mount.get("source") or kind or "none")
        opts = parse_mount_options([str(o) for o in mount.get("options") or []])
        dest = beneath(self.rootfs, str(mount["destination"]))
        if opts.flags & sc.MS_BIND:
            self._bind(source, dest, opts)
        elif kind == "cgroup" or kind == "cgroup2":
            self._cgroup(dest, opts)
        else:
            _make_target(dest, True)
            if kind == "sysfs" and not self.new_netns:
                # sysfs can only be mounted in a network namespace of one's own: bind the host's, without its
                # submounts (its cgroup mounts), as runc does.
                self._bind("/sys", dest, replace(opts, flags=opts.flags | sc.MS_BIND, data=""))
                return
            if opts.copy_up and kind == "tmpfs":
                _mount_copied_up(source, dest, opts)
            else:
                sc.mount(source, str(dest), kind, opts.flags, opts.data or None)
        _propagate(str(dest), opts)
        if opts.rec_set or opts.rec_clear:
            sc.mount_setattr(str(dest), opts.rec_set, opts.rec_clear)

    def _bind(self, source: str, dest: Path, opts: MountOptions) -> None:
        _make_target(dest, os.path.isdir(source))
        flags = opts.flags & (sc.MS_BIND | sc.MS_REC)
        sc.mount(source, str(dest), None, flags)
        extra = opts.flags & ~(sc.MS_BIND | sc.MS_REC | sc.MS_REMOUNT)
        if extra:
            sc.mount(source, str(dest), None, flags | sc.MS_REMOUNT | extra)

    def _cgroup(self, dest: Path, opts: MountOptions) -> None:
        _make_target(dest, True)
        flags = opts.flags & ~sc.MS_BIND
        if set(self.cgroup_paths) == {""}:
            # v2: in a cgroup namespace of its own, cgroup2 shows the container its own subtree; without one
            # it would show (and, writable, hand over) the whole hierarchy, so bind its own cgroup, as runc.
            if self.new_cgroupns:
                sc.mount("cgroup2", str(dest), "cgroup2", flags)
            else:
                self._bind(self.cgroup_paths[""], dest, MountOptions(flags=flags | sc.MS_BIND))
            return
        # v1: a tmpfs holding each hierarchy's container cgroup, bound read-only unless asked otherwise.
        sc.mount("tmpfs", str(dest), "tmpfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, "mode=755")
        for controller, host in self.cgroup_paths.items():
            if not controller:
                continue  # a hybrid host's cgroup2 hierarchy: joined, but runc shows the container none of it
            sub = dest / controller.removeprefix("name=")
            sub.mkdir(exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                sc.mount(host, str(sub), None, sc.MS_BIND | sc.MS_REC)
                sc.mount(host, str(sub), None, sc.MS_BIND | sc.MS_REMOUNT | flags)
        if flags & sc.MS_RDONLY:
            sc.mount("tmpfs", str(dest), None, sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV
                     | sc.MS_NOEXEC, "mode=755")

    def make_devices(self, devices: Sequence[Mapping[str, Any]]) -> None:
        dev = beneath(self.rootfs, "/dev")
        wanted = [{"path": f"/dev/{name}", "type": "c", "major": major, "minor": minor, "fileMode": 0o666}
                  for name, major, minor in DEFAULT_DEVICES]
        for device in [*wanted, *devices]:
            self._device(device)
        for name, target in DEV_LINKS:
            with contextlib.suppress(FileExistsError):
                os.symlink(target, dev / name)
        if os.path.exists("/proc/kcore"):
            with contextlib.suppress(FileExistsError):
                os.symlink("/proc/kcore", dev / "core")

    def _device(self, device: Mapping[str, Any]) -> None:
        dest = beneath(self.rootfs, str(device["path"]))
        kind = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}[str(device["type"])]
        mode = int(device.get("fileMode", 0o666)) & 0o7777
        dest.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        number = os.makedev(int(device.get("major", 0)), int(device.get("minor", 0)))
        if not self.in_userns or kind == stat.S_IFIFO:
            try:
                os.mknod(dest, kind | mode, number)
            except PermissionError:  # a user namespace or a devices cgroup above us: bind the host's, as runc
                pass
            else:
                os.chmod(dest, mode)
                os.chown(dest, int(device.get("uid", 0)), int(device.get("gid", 0)))
                return
        _make_target(dest, False)
        sc.mount(str(device["path"]), str(dest), None, sc.MS_BIND)


def _mount_copied_up(source: str, dest: Path, opts: MountOptions) -> None:
    """runc's tmpcopyup: the tmpfs starts with what the image had at ``dest``. The directory is opened before
    the tmpfs covers it, and its tree copied from that fd, never by a path the image could redirect."""
    lower = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        sc.mount(source, str(dest), "tmpfs", opts.flags, opts.data or None)
        upper = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            copy_tree(lower, upper)
            st = os.fstat(lower)
            os.fchown(upper, st.st_uid, st.st_gid)
            os.fchmod(upper, stat.S_IMODE(st.st_mode))
        finally:
            os.close(upper)
    finally:
        os.close(lower)


def copy_tree(src: int, dst: int) -> None:
    """Copy the directory ``src`` into ``dst`` (both fds): files, directories, symlinks, fifos and devices,
    with their owners and modes, every name opened relative to its parent's fd without following, and no
    filesystem mounted on a directory beneath ``src``. (Only a directory's device tells: overlayfs gives a
    file its lower layer's st_dev, but a directory the overlay's own.)"""
    device = os.fstat(src).st_dev
    for name in os.listdir(src):
        st = os.stat(name, dir_fd=src, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode) and st.st_dev != device:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(name, 0o700, dir_fd=dst)
            inner_src = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src)
            inner_dst = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dst)
            try:
                copy_tree(inner_src, inner_dst)
            finally:
                os.close(inner_src)
                os.close(inner_dst)
        elif stat.S_ISREG(st.st_mode):
            _copy_file(name, src, dst)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=src), name, dir_fd=dst)
        else:
            os.mknod(name, stat.S_IFMT(st.st_mode) | mode, st.st_rdev, dir_fd=dst)
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dst, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(name, mode, dir_fd=dst)


def _copy_file(name: str, src: int, dst: int) -> None:
    source = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=src)
    try:
        target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dst)
        try:
            while os.sendfile(target, source, None, 1 << 20):
                pass
        finally:
            os.close(target)
    finally:
        os.close(source)


def _mountinfo() -> list[tuple[str, str, str, list[str]]]:
    """/proc/self/mountinfo as (root, mount point, fs type, optional fields), in mount order."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        sep = fields.index("-")
        found.append((fields[3], fields[4], fields[sep + 1], fields[6:sep]))
    return found


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _make_parent_private(rootfs: Path) -> None:
    """pivot_root(2) fails (EINVAL) when the new root's parent mount is shared: with rootfsPropagation [r]shared
    the mount holding the rootfs turns private first, as runc's rootfsParentMountPrivate does."""
    holders = [(point, optional) for _, point, _, optional in _mountinfo() if _under(str(rootfs), point)]
    point, optional = max(holders, key=lambda holder: len(holder[0]))
    if any(field.startswith("shared:") for field in optional):
        sc.mount(None, point, None, sc.MS_PRIVATE)


def _detach_host_proc_and_sys(rootfs: Path) -> None:
    """Without pivot_root the old root stays in the mount namespace, and a whole procfs or sysfs left in it lets
    the kernel allow the container a fresh, unmasked one: they go first, as in runc's msMoveRoot."""
    for root, point, fstype, _ in reversed(_mountinfo()):
        if root != "/" or fstype not in ("proc", "sysfs") or _under(point, str(rootfs)):
            continue
        sc.mount(None, point, None, sc.MS_SLAVE | sc.MS_REC)  # the detach must not propagate to the host
        try:
            sc.umount2(point, sc.MNT_DETACH)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EPERM):
                raise
            sc.mount("tmpfs", point, "tmpfs", 0)


def pivot(rootfs: Path, no_pivot: bool) -> None:
    """Make ``rootfs`` the root; the old root is detached (pivot_root) or left under a chroot (--no-pivot)."""
    os.chdir(rootfs)
    if no_pivot:
        _detach_host_proc_and_sys(rootfs)
        sc.mount(str(rootfs), "/", None, sc.MS_MOVE)
        os.chroot(".")
    else:
        old_root = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
        sc.pivot_root(".", ".")  # the old root is stacked on "/", and detached next
        # Only the old root's tree turns slave, so that its detach cannot reach the host: "." is the new root
        # here, and MS_REC on it would make the container's own mounts slaves too (runc fchdirs the same way).
        os.fchdir(old_root)
        os.close(old_root)
        sc.mount(None, ".", None, sc.MS_SLAVE | sc.MS_REC)
        sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")


def mask_and_protect(config: Mapping[str, Any]) -> None:
    """After the pivot: masked paths hidden (/dev/null or an empty read-only tmpfs), read-only paths remounted."""
    linux = config.get("linux") or {}
    for path in linux.get("readonlyPaths") or []:
        try:
            sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
            sc.mount(path, path, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_REC)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise OciRuntimeError(f"linux.readonlyPaths: {path}: {exc.strerror}") from None
    for path in linux.get("maskedPaths") or []:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                sc.mount("tmpfs", path, "tmpfs", sc.MS_RDONLY)
            else:
                sc.mount("/dev/null", path, None, sc.MS_BIND)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise OciRuntimeError(f"linux.maskedPaths: {path}: {exc.strerror}") from None
    if (config.get("root") or {}).get("readonly"):
        sc.mount(None, "/", None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_REC)
