"""Mount options (runtime-spec 1.2 config.md, "Linux mount options"): what each option string does, as runc 1.1
maps them, and their parsing into the flags, propagation and data the init passes to mount(2)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from micropod.errors import SpecError

# mount(2) flags and mount_setattr(2) attributes: kernel ABI, the same on every architecture.
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS, MS_REMOUNT = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20
MS_MANDLOCK, MS_DIRSYNC, MS_NOSYMFOLLOW, MS_NOATIME, MS_NODIRATIME = 0x40, 0x80, 0x100, 0x400, 0x800
MS_BIND, MS_REC, MS_SILENT, MS_UNBINDABLE, MS_PRIVATE = 0x1000, 0x4000, 0x8000, 0x20000, 0x40000
MS_SLAVE, MS_SHARED, MS_RELATIME, MS_I_VERSION, MS_STRICTATIME = 0x80000, 0x100000, 0x200000, 0x800000, 0x1000000
MS_LAZYTIME = 0x2000000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 0x1, 0x2, 0x4, 0x8
MOUNT_ATTR__ATIME, MOUNT_ATTR_RELATIME, MOUNT_ATTR_NOATIME, MOUNT_ATTR_STRICTATIME = 0x70, 0x0, 0x10, 0x20
MOUNT_ATTR_NODIRATIME, MOUNT_ATTR_NOSYMFOLLOW = 0x80, 0x200000

MountOptionKind = Literal["flag", "propagation", "recursive", "extension"]


@dataclass(frozen=True)
class MountOption:
    """How one option string acts: ``flag`` sets (or, with ``clears``, clears) MS_* bits; ``propagation`` is a
    later mount(2) call of its own; ``recursive`` is a mount_setattr(2) attribute; ``extension`` is runc's."""

    kind: MountOptionKind
    value: int
    clears: bool = False


def _opt(kind: MountOptionKind, value: int, clears: bool = False) -> MountOption:
    return MountOption(kind, value, clears)


MOUNT_OPTIONS: dict[str, MountOption] = {
    "async": _opt("flag", MS_SYNCHRONOUS, True), "atime": _opt("flag", MS_NOATIME, True),
    "bind": _opt("flag", MS_BIND), "defaults": _opt("flag", 0), "dev": _opt("flag", MS_NODEV, True),
    "diratime": _opt("flag", MS_NODIRATIME, True), "dirsync": _opt("flag", MS_DIRSYNC),
    "exec": _opt("flag", MS_NOEXEC, True), "iversion": _opt("flag", MS_I_VERSION),
    "lazytime": _opt("flag", MS_LAZYTIME), "loud": _opt("flag", MS_SILENT, True),
    "mand": _opt("flag", MS_MANDLOCK), "noatime": _opt("flag", MS_NOATIME), "nodev": _opt("flag", MS_NODEV),
    "nodiratime": _opt("flag", MS_NODIRATIME), "noexec": _opt("flag", MS_NOEXEC),
    "noiversion": _opt("flag", MS_I_VERSION, True), "nolazytime": _opt("flag", MS_LAZYTIME, True),
    "nomand": _opt("flag", MS_MANDLOCK, True), "norelatime": _opt("flag", MS_RELATIME, True),
    "nostrictatime": _opt("flag", MS_STRICTATIME, True), "nosuid": _opt("flag", MS_NOSUID),
    "nosymfollow": _opt("flag", MS_NOSYMFOLLOW), "rbind": _opt("flag", MS_BIND | MS_REC),
    "relatime": _opt("flag", MS_RELATIME), "remount": _opt("flag", MS_REMOUNT), "ro": _opt("flag", MS_RDONLY),
    "rw": _opt("flag", MS_RDONLY, True), "silent": _opt("flag", MS_SILENT),
    "strictatime": _opt("flag", MS_STRICTATIME), "suid": _opt("flag", MS_NOSUID, True),
    "sync": _opt("flag", MS_SYNCHRONOUS), "symfollow": _opt("flag", MS_NOSYMFOLLOW, True),
    "private": _opt("propagation", MS_PRIVATE), "rprivate": _opt("propagation", MS_PRIVATE | MS_REC),
    "slave": _opt("propagation", MS_SLAVE), "rslave": _opt("propagation", MS_SLAVE | MS_REC),
    "shared": _opt("propagation", MS_SHARED), "rshared": _opt("propagation", MS_SHARED | MS_REC),
    "unbindable": _opt("propagation", MS_UNBINDABLE), "runbindable": _opt("propagation", MS_UNBINDABLE | MS_REC),
    "rro": _opt("recursive", MOUNT_ATTR_RDONLY), "rrw": _opt("recursive", MOUNT_ATTR_RDONLY, True),
    "rnosuid": _opt("recursive", MOUNT_ATTR_NOSUID), "rsuid": _opt("recursive", MOUNT_ATTR_NOSUID, True),
    "rnodev": _opt("recursive", MOUNT_ATTR_NODEV), "rdev": _opt("recursive", MOUNT_ATTR_NODEV, True),
    "rnoexec": _opt("recursive", MOUNT_ATTR_NOEXEC), "rexec": _opt("recursive", MOUNT_ATTR_NOEXEC, True),
    "rnodiratime": _opt("recursive", MOUNT_ATTR_NODIRATIME),
    "rdiratime": _opt("recursive", MOUNT_ATTR_NODIRATIME, True),
    "rrelatime": _opt("recursive", MOUNT_ATTR_RELATIME), "rnorelatime": _opt("recursive", MOUNT_ATTR_RELATIME, True),
    "rnoatime": _opt("recursive", MOUNT_ATTR_NOATIME), "ratime": _opt("recursive", MOUNT_ATTR_NOATIME, True),
    "rstrictatime": _opt("recursive", MOUNT_ATTR_STRICTATIME),
    "rnostrictatime": _opt("recursive", MOUNT_ATTR_STRICTATIME, True),
    "rnosymfollow": _opt("recursive", MOUNT_ATTR_NOSYMFOLLOW),
    "rsymfollow": _opt("recursive", MOUNT_ATTR_NOSYMFOLLOW, True),
    "tmpcopyup": _opt("extension", 1),
}  # fmt: skip

# Recognised, and refused rather than passed to the filesystem as data (where they would fail obscurely).
REFUSED_MOUNT_OPTIONS = {
    "idmap": "id-mapped mounts are not supported by micropod-runtime",
    "ridmap": "id-mapped mounts are not supported by micropod-runtime",
}


@dataclass(frozen=True)
class MountOptions:
    """A mount's options sorted for the init: ``flags`` for mount(2), ``cleared`` the MS_* bits an option such
    as ``rw`` asked off (a bind remount needs them), ``propagation`` one mount(2) call each, ``rec_set`` and
    ``rec_clear`` for mount_setattr(2) with AT_RECURSIVE, ``data`` the filesystem-specific rest."""

    flags: int = 0
    cleared: int = 0
    propagation: tuple[int, ...] = ()
    rec_set: int = 0
    rec_clear: int = 0
    data: str = ""
    copy_up: bool = False


def parse_mount_options(options: Iterable[str], field: str = "options") -> MountOptions:
    """Options in order, later ones winning, as runc does; unknown options become filesystem data."""
    flags = cleared = rec_set = rec_clear = 0
    propagation: list[int] = []
    data: list[str] = []
    copy_up = False
    for i, name in enumerate(options):
        if name in REFUSED_MOUNT_OPTIONS:
            raise SpecError(f"{field}[{i}]", f"{name!r}: {REFUSED_MOUNT_OPTIONS[name]}")
        option = MOUNT_OPTIONS.get(name)
        if option is None:
            data.append(name)
        elif option.kind == "flag":
            # "defaults" is consumed here: runc passes it to the filesystem, where tmpfs refuses it (EINVAL).
            if option.clears:
                flags, cleared = flags & ~option.value, cleared | option.value
            else:
                flags, cleared = flags | option.value, cleared & ~option.value
        elif option.kind == "propagation":
            propagation.append(option.value)
        elif option.kind == "recursive":
            if option.clears:
                rec_set, rec_clear = rec_set & ~option.value, rec_clear | option.value
            else:
                rec_set, rec_clear = rec_set | option.value, rec_clear & ~option.value
                if option.value & MOUNT_ATTR__ATIME == option.value:
                    # mount_setattr(2): an access-time setting also needs MOUNT_ATTR__ATIME in attr_clr.
                    rec_clear |= MOUNT_ATTR__ATIME
        else:
            copy_up = True
    return MountOptions(flags, cleared, tuple(propagation), rec_set, rec_clear, ",".join(data), copy_up)


ROOTFS_PROPAGATIONS = frozenset(name for name, o in MOUNT_OPTIONS.items() if o.kind == "propagation")
