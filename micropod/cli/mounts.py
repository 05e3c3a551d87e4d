"""docker's -v/--volume and --mount for named volumes: parsing only; micropod/volumes.py keeps them."""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from typing import Any, TypeVar

import click

from micropod.errors import UsageError
from micropod.volumes import VolumeRequest, check_name

F = TypeVar("F", bound=Callable[..., Any])

BIND_HINT = ("bind mounts of host paths are not supported yet; use a named volume "
             "(micropod volume create NAME, then -v NAME:/path)")


def _target(path: str, flag: str) -> str:
    if not path.startswith("/"):
        raise UsageError(f"invalid {flag}: the container path {path!r} must be absolute")
    normal = posixpath.normpath(path)
    if normal == "/":
        raise UsageError(f"invalid {flag}: a volume cannot be mounted over the container's root")
    return normal


def parse_volume(text: str) -> VolumeRequest:
    """NAME:/path[:ro|rw], as docker's -v."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise UsageError(f"invalid -v {text!r}: use NAME:/path[:ro]")
    if parts[0].startswith(("/", ".", "~")):
        raise UsageError(f"invalid -v {text!r}: {BIND_HINT}")
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise UsageError(f"invalid -v {text!r}: the mode {mode!r} is not ro or rw")
    return VolumeRequest(check_name(parts[0]), _target(parts[1], "-v"), mode == "ro")


def parse_mount(text: str) -> VolumeRequest:
    """type=volume,source=NAME,target=/path[,readonly], as docker's --mount."""
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        fields[key.strip()] = value if sep else "true"
    kind = fields.pop("type", "volume")
    if kind == "bind":
        raise UsageError(f"invalid --mount {text!r}: {BIND_HINT}")
    if kind != "volume":
        raise UsageError(f"invalid --mount {text!r}: type {kind!r} is not supported (volume is)")
    source = fields.pop("source", None) or fields.pop("src", None)
    target = fields.pop("target", None) or fields.pop("destination", None) or fields.pop("dst", None)
    readonly = fields.pop("readonly", None) or fields.pop("ro", None) or "false"
    if source is None or target is None:
        raise UsageError(f"invalid --mount {text!r}: it needs source=NAME and target=/path")
    if readonly not in ("true", "false", "1", "0"):
        raise UsageError(f"invalid --mount {text!r}: readonly={readonly!r} is not true or false")
    if fields:
        raise UsageError(f"invalid --mount {text!r}: unknown field {sorted(fields)[0]!r}")
    return VolumeRequest(check_name(source), _target(target, "--mount"), readonly in ("true", "1"))


def volume_options(command: F) -> F:
    """-v/--volume and --mount, given to the command as ``volumes``: a tuple of VolumeRequest."""
    def gather(ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
        parser = parse_volume if _param.name == "volume" else parse_mount
        ctx.meta.setdefault("micropod_volumes", []).extend(parser(v) for v in values)
        return values

    command = click.option("--mount", "mount", multiple=True, expose_value=False, callback=gather,
                           help="type=volume,source=NAME,target=/path[,readonly]")(command)
    return click.option("-v", "--volume", "volume", multiple=True, expose_value=False, callback=gather,
                        help="NAME:/path[:ro] (a named volume; made if it does not exist)")(command)


def requested_volumes() -> tuple[VolumeRequest, ...]:
    """What volume_options gathered for the running command; one target at most once."""
    found: list[VolumeRequest] = click.get_current_context().meta.get("micropod_volumes", [])
    targets = [v.target for v in found]
    duplicate = next((t for t in targets if targets.count(t) > 1), None)
    if duplicate is not None:
        raise UsageError(f"duplicate mount point: {duplicate}")
    return tuple(found)
