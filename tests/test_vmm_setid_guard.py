"""The seccomp filter a confined QEMU with a share runs under (micropod/vmm/qemu_confined.py): no set-uid or
set-gid mode through any call that sets one, and no call whose mode a filter cannot see; plain modes pass."""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import pytest

from micropod import syscalls
from micropod.vmm.qemu_confined import setid_guard

_libc = ctypes.CDLL(None, use_errno=True)
SYS_FCHMODAT2, SYS_OPENAT2 = 452, 437


def raw_syscall(number: int, *args: object) -> int:
    result = int(_libc.syscall(number, *args))
    return -ctypes.get_errno() if result == -1 else result


def attempts(tmp: Path) -> dict[str, int]:
    """Each call's outcome: 0, or -errno."""
    def outcome(call: object) -> int:
        try:
            call()  # type: ignore[operator]
        except OSError as exc:
            return -exc.errno
        return 0

    plain, target = tmp / "plain", tmp / "target"
    target.write_text("x")
    return {
        "chmod 0755": outcome(lambda: os.chmod(target, 0o755)),
        "chmod 4755": outcome(lambda: os.chmod(target, 0o4755)),
        "fchmod 2755": outcome(lambda: os.fchmod(os.open(target, os.O_RDONLY), 0o2755)),
        "open O_CREAT 4755": outcome(lambda: os.open(tmp / "new-setuid", os.O_CREAT | os.O_WRONLY, 0o4755)),
        "open O_CREAT 0644": outcome(lambda: os.close(os.open(plain, os.O_CREAT | os.O_WRONLY, 0o644))),
        "mkdir 2755": outcome(lambda: os.mkdir(tmp / "setgid-dir", 0o2755)),
        "mkdir 0755": outcome(lambda: os.mkdir(tmp / "dir", 0o755)),
        "mknod 4644": outcome(lambda: os.mknod(tmp / "node", 0o4644 | 0o100000)),
        "fchmodat2 4755": raw_syscall(SYS_FCHMODAT2, -100, str(target).encode(), 0o4755, 0),
        "openat2": raw_syscall(SYS_OPENAT2, -100, str(target).encode(), None, 0),
    }


@pytest.mark.skipif(os.geteuid() != 0, reason="a child that forks and loads a seccomp filter, as root")
def test_the_guard_refuses_every_set_id_mode_and_lets_plain_ones_pass(tmp_path: Path) -> None:
    program = setid_guard()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the filter is for good, so it stays here
        try:
            syscalls.set_no_new_privs()
            syscalls.seccomp_set_filter(program)
            os.write(write_end, json.dumps(attempts(tmp_path)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        seen = json.loads(pipe.read())
    os.waitpid(pid, 0)
    eperm, enosys = -1, -38
    assert seen == {
        "chmod 0755": 0, "chmod 4755": eperm, "fchmod 2755": eperm, "open O_CREAT 4755": eperm,
        "open O_CREAT 0644": 0, "mkdir 2755": eperm, "mkdir 0755": 0, "mknod 4644": eperm,
        "fchmodat2 4755": eperm, "openat2": enosys,
    }, seen
    assert not (tmp_path / "target").stat().st_mode & 0o6000
