"""Bringing the guest up: its settings and own mounts before the agent's loop starts, and, after a
resume from a snapshot, what must differ from the template (entropy, clock, addresses).

Settings come from the environment, which the kernel fills from unknown ``KEY=value`` words on its
command line (see main.py for the list).
"""

from __future__ import annotations

import os
import time

from micropod import syscalls
from micropod.agent import mounts, netconf
from micropod.agent.errors import RequestError, describe

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

REBOOT_COMMANDS = {
    "restart": syscalls.LINUX_REBOOT_CMD_RESTART,
    "poweroff": syscalls.LINUX_REBOOT_CMD_POWER_OFF,
    "halt": syscalls.LINUX_REBOOT_CMD_HALT,
}


class Config:
    __slots__ = ("channel", "grace", "mount_base", "pod", "reboot", "test_mode")

    def __init__(self, env: dict[str, str]) -> None:
        self.channel = env.get("MICROPOD_AGENT_CHANNEL", "auto")
        self.test_mode = self.channel.startswith("unix:")
        self.mount_base = env.get("MICROPOD_AGENT_MOUNT_BASE", "/mnt")
        # A pod's VM: containers come and go; the VM stays up until the host shuts it down.
        self.pod = env.get("MICROPOD_AGENT_POD") == "1"
        self.reboot = REBOOT_COMMANDS.get(env.get("MICROPOD_AGENT_REBOOT", "restart"),
                                          syscalls.LINUX_REBOOT_CMD_RESTART)
        try:
            self.grace = float(env.get("MICROPOD_AGENT_GRACE", "10"))
        except ValueError:
            self.grace = 10.0


def boot() -> list[str]:
    """The guest's own mounts; each failure is reported and the rest still tried."""
    errors = []
    for op in mounts.boot_plan():
        try:
            mounts.apply([op], [])
        except OSError as exc:
            errors.append(str(exc))
    try:
        netconf.loopback_up()
    except (OSError, netconf.NetconfError) as exc:
        errors.append(f"loopback: {exc}")
    # The kernel opens /dev/console as fds 0-2 only if it exists when init starts.
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            target = os.open("/dev/console", os.O_RDWR | os.O_NOCTTY)
            if target != fd:
                os.dup2(target, fd)
                os.close(target)
    return errors


def isolate_test_run() -> None:
    """Test mode: keep the container's mounts and hostname away from the host running the tests."""
    syscalls.unshare(syscalls.CLONE_NEWNS | syscalls.CLONE_NEWUTS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)


def restore(message: dict[str, Any], test_mode: bool) -> dict[str, Any]:
    """First request after the VM was resumed from a snapshot: make it this VM, not the template."""
    seed = bytes.fromhex(str(message.get("entropy", "")))
    if len(seed) < 32:
        raise RequestError("restore needs at least 32 bytes of entropy")
    if not test_mode:
        syscalls.add_entropy(seed)
        time.clock_settime(time.CLOCK_REALTIME, float(message["time"]))
    return {"uptime": time.clock_gettime(time.CLOCK_BOOTTIME)}


def configure_network(message: dict[str, Any]) -> dict[str, Any]:
    """Address the VM's NICs with what the host leased (a restored VM kept the template's view)."""
    interfaces = message.get("interfaces")
    if not isinstance(interfaces, list):
        raise RequestError("network needs a list of interfaces")
    for interface in interfaces:
        try:
            netconf.configure_from(interface)
        except (KeyError, ValueError, OSError, netconf.NetconfError) as exc:
            raise RequestError(f"network: {describe(exc)}") from None
    return {}
