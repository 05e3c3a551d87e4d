"""Test only: the main container's program takes the agent's place as PID 1 and owns the channel.

Set by the host alone, with ``MICROPOD_AGENT_HANDOVER=1`` on the kernel command line (the host adds it when
its own environment has MICROPOD_TEST_HOSTILE_GUEST=1, see micropod/vmm/factory.py). The end-to-end tests use
it to run a real VM whose guest speaks the host protocol itself, as a container that took the guest over
would. It grants a guest nothing it could not take: a container that escapes micropod-runtime's confinement
(or a ``--privileged`` one, which can load modules and reach every device) owns the guest, channel included,
and the host must hold against exactly that.

At ``start`` the agent answers ok, then execs ``python3.11 -I -S <container root>/<args[0]> <args[1:]>``,
keeping the channel's fd open across the exec and naming it in MICROPOD_HANDOVER_FD; the container's id and
session come in MICROPOD_HANDOVER_ID and MICROPOD_HANDOVER_SID. Bytes the agent had read but not yet framed
are lost, which a hostile guest would not care about either. An exec that fails after the ok ends the agent,
and with it the VM (PID 1 exited), so the host sees a dead VM and its console, never a silent one.
"""

from __future__ import annotations

import os
import sys

from micropod import wire
from micropod.agent.console import console
from micropod.agent.errors import RequestError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from micropod.agent.containers import Container
    from micropod.agent.hostlink import HostLink

SWITCH = "MICROPOD_AGENT_HANDOVER"


def enabled(env: dict[str, str]) -> bool:
    return env.get(SWITCH, "") == "1"


def argv(container: Container) -> list[str]:
    """The interpreter's argv: the script's path is the container's ``args[0]`` beneath its root."""
    args = [str(a) for a in container.spec.get("args") or []]
    if not args or not args[0].startswith("/"):
        raise RequestError(f"handover needs an absolute script path as the command, got {args[:1]}")
    return [sys.executable, "-I", "-S", container.root + args[0], *args[1:]]


def hand_over(link: HostLink, container: Container, message: dict[str, Any], sid: int) -> None:
    """Reply ok to ``start`` and become the container's script; RequestError (no ok sent) if it cannot."""
    channel = link.channel
    if channel is None:
        raise RequestError("handover needs a connected channel")
    args = argv(container)
    if not os.path.isfile(args[3]):
        raise RequestError(f"handover: no script {args[3]}")
    os.set_inheritable(channel.fd, True)
    env = {
        "MICROPOD_HANDOVER_FD": str(channel.fd),
        "MICROPOD_HANDOVER_ID": container.cid,
        "MICROPOD_HANDOVER_SID": str(sid),
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    }
    channel.send(wire.encode_control({"op": wire.GuestOp.OK, "req": message.get("req"), "pid": os.getpid()}))
    try:
        os.execve(args[0], args, env)
    except OSError as exc:
        console(f"handover failed: {exc}")
        os._exit(127)
