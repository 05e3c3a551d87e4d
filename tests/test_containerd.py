"""containerd as a real client of the runtime under test: `ctr` runs a busybox image through the runc shim
with the runtime as its BinaryName."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from micropod.image.demo import DEMO_REFERENCE
from tests.containerd_harness import NAMESPACE, Containerd, containerd
from tests.runtime_bundle import (  # noqa: F401  (fixtures)
    CGROUP_PARENT,
    Runtime,
    cgroup_dirs,
    cgroup_subtree_fixture,
    runc_fixture,
    runtime_fixture,
)

pytestmark = pytest.mark.runtime


@contextlib.contextmanager
def daemon_with_image(runtime: Runtime, archive: Path) -> Iterator[Containerd]:
    with containerd(runtime) as daemon:
        daemon.ctr("image", "import", str(archive), check=True, timeout=120)
        yield daemon


def assert_nothing_left(daemon: Containerd, runtime: Runtime, cid: str) -> None:
    assert daemon.ctr("container", "ls", "-q", check=True).stdout.split() == []
    assert daemon.tasks() == {}
    # The shim gives the runtime --root <runc-root>/<containerd namespace>.
    state_root = runtime.root / NAMESPACE
    assert not state_root.exists() or list(state_root.iterdir()) == [], f"{runtime.name} left state"
    assert cgroup_dirs(f"{CGROUP_PARENT}/ctrd-{cid}") == []


def test_ctr_run_prints_output_and_exits_with_its_code(runtime: Runtime, hello_archive: Path) -> None:
    with daemon_with_image(runtime, hello_archive) as daemon:
        done = daemon.ctr("run", "--rm", *daemon.run_options("once"), DEMO_REFERENCE, "once",
                          "sh", "-c", "echo out; echo err >&2; exit 7")
        assert (done.returncode, done.stdout) == (7, "out\n"), done.stderr
        assert "err" in done.stderr
        assert_nothing_left(daemon, runtime, "once")


def test_ctr_task_exec_kill_pause_resume_delete(runtime: Runtime, hello_archive: Path) -> None:
    with daemon_with_image(runtime, hello_archive) as daemon:
        daemon.ctr("run", "-d", *daemon.run_options("long"), DEMO_REFERENCE, "long", "sleep", "1000", check=True)
        assert daemon.tasks() == {"long": "RUNNING"}
        assert (runtime.root / NAMESPACE / "long").is_dir(), f"{runtime.name} keeps no state where the shim said"
        assert cgroup_dirs(f"{CGROUP_PARENT}/ctrd-long"), "the container has no cgroup in the test's subtree"
        assert any(" create " in f" {call} " for call in daemon.runtime_calls()), daemon.runtime_calls()

        done = daemon.ctr("task", "exec", "--exec-id", "probe", "long", "sh", "-c", "echo in exec; exit 5")
        assert (done.returncode, done.stdout) == (5, "in exec\n"), done.stderr
        pids = daemon.ctr("task", "ps", "long", check=True).stdout.splitlines()[1:]
        assert len(pids) == 1, "the exec'd process should be gone"

        daemon.ctr("task", "pause", "long", check=True)
        assert daemon.tasks() == {"long": "PAUSED"}
        daemon.ctr("task", "resume", "long", check=True)
        assert daemon.tasks() == {"long": "RUNNING"}

        daemon.ctr("task", "kill", "-s", "SIGKILL", "long", check=True)
        daemon.wait_task_status("long", "STOPPED")
        daemon.ctr("task", "delete", "long", check=True)
        daemon.ctr("container", "delete", "long", check=True)
        assert_nothing_left(daemon, runtime, "long")
