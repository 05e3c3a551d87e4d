"""The guest's PID 1: boot mounts, the channel to the host, then the agent's loop (micropod/agent/main.py).

Settings come from the environment, which the kernel fills from unknown ``KEY=value`` words on its
command line: MICROPOD_AGENT_CHANNEL (auto | serial | vsock | unix:PATH, the last being test mode),
MICROPOD_AGENT_REBOOT (restart | poweroff | halt), MICROPOD_AGENT_GRACE (seconds to wait for
``shutdown`` after the last main process exits), MICROPOD_AGENT_MOUNT_BASE (where a lone container's
disks are mounted; the guest image provides /mnt/lower, /mnt/upper and /mnt/root), MICROPOD_AGENT_POD=1
(a pod's VM: it stays up when its containers exit), and, for tests only, MICROPOD_AGENT_HANDOVER=1 (the
container's program replaces the agent: see handover.py).
"""

from __future__ import annotations

import os
import sys

from micropod import syscalls
from micropod.agent import boot
from micropod.agent import channel as channels
from micropod.agent.console import console
from micropod.agent.main import Agent
from micropod.wire import GuestOp

# The same values as micropod.vmm.base, which the agent cannot import (dataclasses, pathlib).
AGENT_SERIAL_NAME = "micropod.agent"
AGENT_VSOCK_PORT = 1024


def main() -> None:
    config = boot.Config(dict(os.environ))
    boot_errors: list[str] = []
    if config.test_mode:
        boot.isolate_test_run()
    elif os.getpid() == 1:
        boot_errors = boot.boot()
    if os.getpid() != 1:
        syscalls.set_child_subreaper()
    agent = Agent(config)
    for error in boot_errors:
        console(error)
    try:
        if config.test_mode:
            agent.link.attach(channels.connect_unix(config.channel[len("unix:"):]))
        else:
            channel, listener = channels.open_guest_channel(config.channel, AGENT_SERIAL_NAME, AGENT_VSOCK_PORT)
            if listener is not None:
                agent.link.listen(listener)
            elif channel is not None:
                agent.link.attach(channel)
    except OSError as exc:
        console(f"cannot open the channel to the host: {exc}")
        if config.test_mode:
            sys.exit(1)
        agent.end()
    for error in boot_errors:
        agent.send_control({"op": GuestOp.LOG, "message": f"boot: {error}"})
    sys.exit(agent.run())


if __name__ == "__main__":
    main()
