"""The restart policy across a monitor's boots: boot again while the policy wants it, waiting docker's growing delay
in between."""

from __future__ import annotations

import time
from typing import Protocol

from micropod.runconfig import RestartPolicy, restart_backoff

BACKOFF_RESET = 10.0  # a run this long resets the restart delay, as docker does


class Boots(Protocol):
    @property
    def restart_policy(self) -> RestartPolicy:
        """The container's policy as it is now (`micropod update --restart` changes it)."""

    @property
    def user_stopped(self) -> bool:
        """A stop, a kill or a signal came: no restart policy boots again after that."""

    def run_once(self) -> int:
        """Boot the VM and run it until it ends; its exit code."""

    def announce_restart(self, code: int, restarts: int) -> None:
        """Record and tell the clients that this is restart number ``restarts``, after ``code``."""

    def wait(self, delay: float) -> bool:
        """Serve clients for ``delay`` seconds; False if told to stop meanwhile."""

    def reset(self) -> None:
        """Forget the ended boot, for the next one."""


def run_with_restarts(boots: Boots) -> None:
    restarts = 0
    backoff_step = 0
    while True:
        started = time.monotonic()
        code = boots.run_once()
        if not boots.restart_policy.wants_restart(code, restarts, boots.user_stopped):
            return
        if time.monotonic() - started >= BACKOFF_RESET:
            backoff_step = 0
        restarts += 1
        boots.announce_restart(code, restarts)
        if not boots.wait(restart_backoff(backoff_step)):
            return
        backoff_step += 1
        boots.reset()
