"""micropod-runtime against the container's known ways out of runc: a leaked directory fd as the working
directory (CVE-2024-21626), the runtime's own interpreter run inside (CVE-2019-5736), and a state root another
user can write to."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import forked
from tests.runtime_bundle import Runtime, cgroup_subtree_fixture, make_bundle, runtime_named  # noqa: F401

pytestmark = pytest.mark.runtime


@pytest.fixture
def micropod(tmp_path: Path, cgroup_subtree: str) -> Iterator[Runtime]:
    runtime = runtime_named("micropod", tmp_path)
    try:
        yield runtime
    finally:
        runtime.delete_all()


def test_a_directory_fd_of_the_runtime_is_no_working_directory(micropod: Runtime, tmp_path: Path) -> None:
    """The runtime is handed an open directory of the host (as runc leaked one); a process whose cwd names it
    through /proc/self/fd must not start there, for run and for exec."""
    secret = tmp_path / "host-dir"
    secret.mkdir()
    (secret / "SECRET").touch()
    opened = os.open(secret, os.O_RDONLY | os.O_DIRECTORY)
    fd = os.dup2(opened, 50)  # high, as the agent's: the low numbers are the runtime's own by then
    os.close(opened)
    try:
        bundle = make_bundle(tmp_path, ["sh", "-c", "pwd; ls"], process={"cwd": f"/proc/self/fd/{fd}"})
        done = micropod.run("run", "--bundle", str(bundle), "leak", pass_fds=(fd,))
        assert done.returncode != 0 and "SECRET" not in done.stdout, (done.stdout, done.stderr)
        assert "cwd" in done.stderr, done.stderr

        bundle = make_bundle(tmp_path / "b2", ["sleep", "100"])
        micropod.run("run", "-d", "--bundle", str(bundle), "box", check=True)
        done = micropod.run("exec", "--cwd", f"/proc/self/fd/{fd}", "box", "sh", "-c", "pwd; ls", pass_fds=(fd,))
        assert done.returncode == 255 and "SECRET" not in done.stdout, (done.stdout, done.stderr)
    finally:
        os.close(fd)


def test_no_fd_of_the_caller_reaches_the_container_past_the_preserved_ones(micropod: Runtime,
                                                                           tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.set_inheritable(fd, True)
        bundle = make_bundle(tmp_path, ["sh", "-c", "ls /proc/self/fd"])
        done = micropod.run("run", "--bundle", str(bundle), "fds", pass_fds=(fd,))
        assert done.returncode == 0, done.stderr
        assert sorted(int(n) for n in done.stdout.split()) == [0, 1, 2, 3], done.stdout  # 3: ls's own listing
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", ["direct", "shebang"])
def test_the_container_cannot_run_the_runtimes_own_interpreter(micropod: Runtime, tmp_path: Path,
                                                               how: str) -> None:
    bundle = make_bundle(tmp_path, ["/proc/self/exe", "-c", "print('inside')"] if how == "direct" else ["/x.sh"])
    (bundle / "rootfs" / "x.sh").write_text("#!/proc/self/exe -c print('inside')\n")
    (bundle / "rootfs" / "x.sh").chmod(0o755)
    done = micropod.run("run", "--bundle", str(bundle), "self")
    assert done.returncode != 0 and "inside" not in done.stdout, (done.stdout, done.stderr)
    assert "own interpreter" in done.stderr, done.stderr


def test_a_state_root_others_can_write_to_is_refused(tmp_path: Path, cgroup_subtree: str) -> None:
    runtime = runtime_named("micropod", tmp_path)
    runtime.root.mkdir(mode=0o777)
    os.chmod(runtime.root, 0o777)
    bundle = make_bundle(tmp_path, ["true"])
    done = runtime.run("run", "--bundle", str(bundle), "c1")
    assert done.returncode == 1 and "no one else can write to" in done.stderr, done.stderr
    assert list(runtime.root.iterdir()) == []


def _in_child(body: Callable[[int], str]) -> str:
    """``body`` in a forked child, given the fd it reports through; what it returns (or the error it raised)."""
    _, data = forked.in_child(body, given_fd=True)
    reply = json.loads(data)
    return str(reply.get("result", reply.get("error")))


def test_a_forked_child_keeps_no_fd_of_its_parent_but_those_asked_for(tmp_path: Path) -> None:
    from micropod.runtime.process import detach_from_parent

    held = [os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY) for _ in range(3)]
    try:
        def body(report: int) -> str:
            detach_from_parent({held[1], report})
            return " ".join(sorted(os.listdir("/proc/self/fd"), key=int))

        left = [int(n) for n in _in_child(body).split()]
        assert held[1] in left and held[0] not in left and held[2] not in left, left
    finally:
        for fd in held:
            os.close(fd)


def test_a_working_directory_outside_the_root_is_refused(tmp_path: Path) -> None:
    from micropod.runtime.process import enter_cwd

    (tmp_path / "root").mkdir()
    outside = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        def body(report: int) -> str:
            os.chroot(tmp_path / "root")
            os.fchdir(outside)  # as a leaked fd would put us
            enter_cwd(".")
            return "entered"

        result = _in_child(body)  # glibc's getcwd fails with ENOENT there; the kernel's says "(unreachable)"
        assert result.startswith("ProgramError") and "entered" not in result, result
    finally:
        os.close(outside)
