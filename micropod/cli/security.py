"""docker's security flags for `run` and `create`: --privileged, --cap-add, --cap-drop, --security-opt.

They reach the agent in the container spec, which turns them into the bundle's capabilities and seccomp
filter (micropod/agent/bundle.py). Names are checked here, so a typo is one line before any VM boots.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from micropod.errors import UsageError
from micropod.runconfig import SecurityOptions

MAX_PROFILE = 1 << 20


def security_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the four options and hands the command one ``security`` argument."""

    @functools.wraps(command)
    def wrapper(*args: Any, privileged: bool, cap_add: tuple[str, ...], cap_drop: tuple[str, ...],
                security_opt: tuple[str, ...], **kwargs: Any) -> Any:
        return command(*args, security=parse(privileged, cap_add, cap_drop, security_opt), **kwargs)

    for option in reversed((
        click.option("--privileged", is_flag=True, help="All capabilities, no seccomp filter, /sys and cgroups rw."),
        click.option("--cap-add", multiple=True, help="Add a Linux capability (e.g. NET_ADMIN, or ALL)."),
        click.option("--cap-drop", multiple=True, help="Drop a Linux capability (e.g. CHOWN, or ALL)."),
        click.option("--security-opt", multiple=True,
                     help="seccomp=unconfined|PROFILE.json, or no-new-privileges[=true|false]."),
    )):
        wrapper = option(wrapper)
    return wrapper


def _capability(raw: str) -> str:
    from micropod.runtime import caps

    name = raw.upper()
    name = name if name.startswith("CAP_") else f"CAP_{name}"
    if name != "CAP_ALL" and name not in caps.NUMBERS:
        raise UsageError(f"unknown capability: {raw!r}")
    return name


def parse(privileged: bool, cap_add: tuple[str, ...], cap_drop: tuple[str, ...],
          security_opt: tuple[str, ...]) -> SecurityOptions:
    seccomp, no_new_privileges, vmm_confinement = "default", False, True
    for opt in security_opt:
        key, sep, value = opt.partition("=" if "=" in opt else ":")
        if key == "no-new-privileges":
            if value not in ("", "true", "false"):
                raise UsageError(f"invalid --security-opt {opt!r}: no-new-privileges takes true or false")
            no_new_privileges = value != "false"
        elif key == "seccomp" and sep:
            seccomp = value if value == "unconfined" else _profile(Path(value))
        elif key == "vmm-confinement" and value in ("on", "off"):
            vmm_confinement = value == "on"
        else:
            raise UsageError(f"invalid --security-opt {opt!r}: micropod knows seccomp=, no-new-privileges and "
                             "vmm-confinement=on|off")
    return SecurityOptions(privileged=privileged, cap_add=tuple(_capability(c) for c in cap_add),
                           cap_drop=tuple(_capability(c) for c in cap_drop), seccomp=seccomp,
                           no_new_privileges=no_new_privileges, vmm_confinement=vmm_confinement)


def _profile(path: Path) -> str:
    from micropod.jsonfile import read_json_object

    profile = read_json_object(path, MAX_PROFILE, f"--security-opt seccomp={path}: the profile")
    return json.dumps(profile)
