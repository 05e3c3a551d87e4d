"""create's exchange with its children, in-process as the guest agent drives it (micropod/runtime/lifecycle.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.forked import in_child
from tests.runtime_bundle import cgroup_subtree_fixture, make_bundle  # noqa: F401  (fixtures)

pytestmark = pytest.mark.runtime


def test_init_overtaking_stage_one_still_gets_its_pid_reported(tmp_path: Path, cgroup_subtree: str) -> None:
    """Stage one and init share the sync socket, and init's "ready" can come before stage one's report of
    its pid when stage one is descheduled after its fork (seen once in CI under load): create took pid 0
    for init and failed with "the container's init exited during create". Stage one is slowed here."""
    bundle = make_bundle(tmp_path, ["true"])

    def body() -> list[Any]:
        from micropod.runtime import sync
        from micropod.runtime.lifecycle import CreateOptions, Lifecycle
        from micropod.runtime.state import StateDir, start_time

        reply = sync.SyncSocket.send

        def slow_pid_report(self: sync.SyncSocket, **message: Any) -> None:
            if "init" in message:
                time.sleep(1.0)
            reply(self, **message)

        sync.SyncSocket.send = slow_pid_report  # type: ignore[method-assign]
        life = Lifecycle(StateDir(tmp_path / "root"))
        container = life.create("overtaken", CreateOptions(bundle=bundle))
        try:
            return [container.pid > 1, start_time(container.pid) == container.pid_start]
        finally:
            life.delete("overtaken", force=True)

    status, out = in_child(body, timeout=60)
    assert status == 0 and b'"result": [true, true]' in out, out
