"""docker's -v/--volume and --mount (named volumes), --tmpfs and --read-only: parsing only; micropod/volumes.py
keeps the volumes."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click

from micropod.errors import UsageError
from micropod.runconfig import BindMount, DeviceMapping, TmpfsMount
from micropod.volumes import VolumeRequest, check_name

F = TypeVar("F", bound=Callable[..., Any])

_META = "micropod_mounts"
_TMPFS_OPTION = re.compile(r"^[a-z_]+(=[0-9A-Za-z.%_:+-]+)?$")


def _target(path: str, flag: str) -> str:
    if not path.startswith("/"):
        raise UsageError(f"invalid {flag}: the container path {path!r} must be absolute")
    normal = posixpath.normpath(path)
    if normal == "/":
        raise UsageError(f"invalid {flag}: a volume cannot be mounted over the container's root")
    return normal


def parse_volume(text: str) -> VolumeRequest | BindMount:
    """NAME:/path[:ro|rw] or /host/dir:/path[:ro|rw], as docker's -v."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise UsageError(f"invalid -v {text!r}: use NAME:/path[:ro]")
    if parts[0].startswith((".", "~")):
        raise UsageError(f"invalid -v {text!r}: a host directory must be given as an absolute path")
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise UsageError(f"invalid -v {text!r}: the mode {mode!r} is not ro or rw")
    if parts[0].startswith("/"):
        return BindMount(parts[0], _target(parts[1], "-v"), mode == "ro")
    return VolumeRequest(check_name(parts[0]), _target(parts[1], "-v"), mode == "ro")


def parse_mount(text: str) -> VolumeRequest | BindMount:
    """type=volume|bind,source=NAME|/host/dir,target=/path[,readonly], as docker's --mount."""
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        fields[key.strip()] = value if sep else "true"
    kind = fields.pop("type", "volume")
    if kind not in ("volume", "bind"):
        raise UsageError(f"invalid --mount {text!r}: type {kind!r} is not supported (volume and bind are)")
    source = fields.pop("source", None) or fields.pop("src", None)
    target = fields.pop("target", None) or fields.pop("destination", None) or fields.pop("dst", None)
    readonly = fields.pop("readonly", None) or fields.pop("ro", None) or "false"
    if source is None or target is None:
        raise UsageError(f"invalid --mount {text!r}: it needs source=NAME and target=/path")
    if readonly not in ("true", "false", "1", "0"):
        raise UsageError(f"invalid --mount {text!r}: readonly={readonly!r} is not true or false")
    if fields:
        raise UsageError(f"invalid --mount {text!r}: unknown field {sorted(fields)[0]!r}")
    if kind == "bind":
        if not source.startswith("/"):
            raise UsageError(f"invalid --mount {text!r}: a bind's source must be an absolute host path")
        return BindMount(source, _target(target, "--mount"), readonly in ("true", "1"))
    return VolumeRequest(check_name(source), _target(target, "--mount"), readonly in ("true", "1"))


def parse_tmpfs(text: str) -> TmpfsMount:
    """PATH[:OPTIONS], as docker's --tmpfs (OPTIONS as mount(8)'s, e.g. size=64m,mode=1777)."""
    path, _, options = text.partition(":")
    words = tuple(word for word in options.split(",") if word)
    bad = next((w for w in words if not _TMPFS_OPTION.match(w)), None)
    if bad is not None:
        raise UsageError(f"invalid --tmpfs {text!r}: the option {bad!r} is not a tmpfs mount option")
    return TmpfsMount(_target(path, "--tmpfs"), words)


def parse_device(text: str) -> DeviceMapping:
    """docker's --device PATH[:CONTAINER_PATH][:PERMISSIONS], for a device of the VM's own kernel
    (micropod/agent/devices.py)."""
    parts = text.split(":")
    if len(parts) == 2 and parts[1] and not parts[1].startswith("/"):
        parts = [parts[0], parts[0], parts[1]]  # PATH:PERMISSIONS
    if not 1 <= len(parts) <= 3 or not parts[0]:
        raise UsageError(f"invalid --device {text!r}: it is PATH[:CONTAINER_PATH][:PERMISSIONS]")
    try:
        return DeviceMapping.requested(*parts)
    except UsageError as exc:
        raise UsageError(f"invalid --device {text!r}: {exc.message}") from None


@dataclass
class MountRequests:
    """What -v, --mount, --tmpfs, --read-only and --device asked for, gathered as click parses them."""

    volumes: list[VolumeRequest] = field(default_factory=list)
    binds: list[BindMount] = field(default_factory=list)
    tmpfs: list[TmpfsMount] = field(default_factory=list)
    read_only: bool = False
    devices: list[DeviceMapping] = field(default_factory=list)

    def check(self) -> MountRequests:
        targets = [v.target for v in self.volumes] + [b.target for b in self.binds] + [t.target for t in self.tmpfs]
        duplicate = next((t for t in targets if targets.count(t) > 1), None)
        if duplicate is not None:
            raise UsageError(f"duplicate mount point: {duplicate}")
        names = [v.name for v in self.volumes]
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice is not None:  # two disks backed by one file, mounted twice by the guest: a corrupt volume
            raise UsageError(f"the volume {twice} is named twice: mount it once")
        return self


def mount_options(command: F) -> F:
    """-v/--volume, --mount, --tmpfs and --read-only; the command reads them with ``requested_mounts()``."""
    def gather(ctx: click.Context, param: click.Parameter, values: Any) -> None:
        found: MountRequests = ctx.meta.setdefault(_META, MountRequests())
        if param.name == "read_only":
            found.read_only = bool(values)
        elif param.name == "tmpfs":
            found.tmpfs.extend(parse_tmpfs(v) for v in values)
        elif param.name == "device":
            found.devices.extend(parse_device(v) for v in values)
        else:
            for value in values:
                parsed = (parse_volume if param.name == "volume" else parse_mount)(value)
                if isinstance(parsed, BindMount):
                    found.binds.append(parsed)
                else:
                    found.volumes.append(parsed)

    options = [
        click.option("-v", "--volume", "volume", multiple=True, expose_value=False, callback=gather,
                     help="NAME:/path[:ro] (a named volume, made if new) or /host/dir:/path[:ro] (QEMU only)"),
        click.option("--mount", "mount", multiple=True, expose_value=False, callback=gather,
                     help="type=volume|bind,source=NAME|/host/dir,target=/path[,readonly]"),
        click.option("--tmpfs", "tmpfs", multiple=True, expose_value=False, callback=gather,
                     help="PATH[:OPTIONS] (a tmpfs, rw,noexec,nosuid,nodev unless the options say otherwise)"),
        click.option("--read-only", "read_only", is_flag=True, expose_value=False, callback=gather,
                     help="Mount the container's root read-only."),
        click.option("--device", "device", multiple=True, expose_value=False, callback=gather,
                     help="PATH[:CONTAINER_PATH][:rwm], a device of the VM's own kernel: /dev/fuse, /dev/net/tun"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def requested_mounts() -> MountRequests:
    found: MountRequests = click.get_current_context().meta.get(_META) or MountRequests()
    return found.check()
