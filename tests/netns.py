"""Run a test body inside a fresh network namespace of its own: a forked child that unshares one.

Nothing can leak into the machine's root namespace, and everything the body made (bridge, TAPs,
nftables tables, sysctls) vanishes with the child.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from typing import Any

CLONE_NEWNET = 0x40000000


def _child(body: Callable[..., Any], args: tuple[Any, ...], conn: Any) -> None:
    from micropod import syscalls
    from micropod.agent.netconf import loopback_up

    try:
        syscalls.unshare(CLONE_NEWNET)
        loopback_up()
        conn.send(("ok", body(*args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def in_fresh_netns(body: Callable[..., Any], *args: Any, timeout: float = 60) -> Any:
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_child, args=(body, args, child))
    process.start()
    try:
        if not parent.poll(timeout):
            raise AssertionError(f"the netns test body did not finish within {timeout}s")
        status, value = parent.recv()
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
    if status != "ok":
        raise AssertionError(f"in the test's network namespace:\n{value}")
    return value
