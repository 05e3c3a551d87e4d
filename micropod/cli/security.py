"""docker's security flags for `run` and `create`: --privileged, --cap-add, --cap-drop, --security-opt.

They reach the agent in the container spec, which turns them into the bundle's capabilities and seccomp
filter (micropod/agent/bundle.py). Names are checked here, so a typo is one line before any VM boots.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from micropod.securityopts import parse


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
