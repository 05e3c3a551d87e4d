"""micropod.syscalls against the real kernel: mounts in a private temp dir, errors that name the call."""

from __future__ import annotations

import errno
import os
import traceback
from pathlib import Path

import pytest

from micropod import syscalls

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mount needs CAP_SYS_ADMIN")


def mounted(path: Path) -> bool:
    return any(line.split()[4] == str(path) for line in Path("/proc/self/mountinfo").read_text().splitlines())


@needs_root
def test_mount_and_umount_a_tmpfs(tmp_path: Path) -> None:
    target = tmp_path / "mnt"
    target.mkdir()
    syscalls.mount("tmpfs", str(target), "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "size=1m,mode=0700")
    try:
        assert mounted(target)
        (target / "file").write_text("in tmpfs")
        assert oct(target.stat().st_mode & 0o777) == "0o700"
    finally:
        syscalls.umount2(str(target))
    assert not mounted(target)
    assert not (target / "file").exists()


@needs_root
def test_read_only_flag_is_applied(tmp_path: Path) -> None:
    syscalls.mount("tmpfs", str(tmp_path), "tmpfs", syscalls.MS_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            (tmp_path / "file").write_text("x")
        assert info.value.errno == errno.EROFS
    finally:
        syscalls.umount2(str(tmp_path), syscalls.MNT_DETACH)


def test_bad_mount_raises_oserror_naming_the_call(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        syscalls.mount("none", str(tmp_path / "missing"), "nosuchfs")
    assert info.value.errno in (errno.ENODEV, errno.ENOENT, errno.EPERM)
    message = str(info.value)
    assert message.startswith(f"[Errno {info.value.errno}] mount none on {tmp_path}/missing (type nosuchfs")
    assert os.strerror(info.value.errno) in message


def test_umount_of_a_non_mount_point_fails_with_einval(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        syscalls.umount2(str(tmp_path))
    assert info.value.errno in (errno.EINVAL, errno.EPERM)
    assert f"umount2 {tmp_path}" in str(info.value)


def test_reboot_refuses_an_invalid_command() -> None:
    # An unknown magic number is EINVAL (or EPERM without CAP_SYS_BOOT): never reboots the test host.
    with pytest.raises(OSError) as info:
        syscalls.reboot(0x12345678)
    assert info.value.errno in (errno.EINVAL, errno.EPERM)
    assert "reboot" in str(info.value)


def _in_child(body: str) -> int:
    """Run ``body`` (a syscalls call) in a forked child, so namespace changes stay there."""
    pid = os.fork()
    if pid == 0:
        try:
            exec(body, {"syscalls": syscalls, "os": os})
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@needs_root
def test_unshare_gives_a_private_mount_namespace(tmp_path: Path) -> None:
    body = (
        "syscalls.unshare(syscalls.CLONE_NEWNS)\n"
        "syscalls.mount(None, '/', None, syscalls.MS_REC | syscalls.MS_PRIVATE)\n"
        f"syscalls.mount('tmpfs', {str(tmp_path)!r}, 'tmpfs')\n"
        f"open({str(tmp_path / 'inside')!r}, 'w').close()\n"
    )
    assert _in_child(body) == 0
    assert not (tmp_path / "inside").exists()
    assert not mounted(tmp_path)


def test_child_subreaper_adopts_orphans() -> None:
    assert _in_child(
        "syscalls.set_child_subreaper()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    grandchild = os.fork()\n"
        "    if grandchild == 0:\n"
        "        os._exit(0)\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "reaped, _ = os.waitpid(-1, 0)\n"  # the orphaned grandchild is ours to reap
        "assert reaped != pid\n"
    ) == 0


@needs_root
def test_pty_from_a_devpts_instance(tmp_path: Path) -> None:
    assert _in_child(
        "syscalls.unshare(syscalls.CLONE_NEWNS)\n"
        "syscalls.mount(None, '/', None, syscalls.MS_REC | syscalls.MS_PRIVATE)\n"
        f"syscalls.mount('devpts', {str(tmp_path)!r}, 'devpts', 0, 'newinstance,ptmxmode=0666')\n"
        f"master, slave = syscalls.open_pty({str(tmp_path / 'ptmx')!r})\n"
        "assert os.isatty(slave)\n"
        f"assert os.readlink(f'/proc/self/fd/{{slave}}') == {str(tmp_path / '0')!r}\n"
        "syscalls.set_window_size(master, 24, 80)\n"
        "os.write(master, b'ping\\n')\n"
        "assert os.read(slave, 100) == b'ping\\n'\n"
    ) == 0


def test_add_entropy_credits_the_pool() -> None:
    # Root on the test host: a real RNDADDENTROPY + RNDRESEEDCRNG, harmless to add to.
    syscalls.add_entropy(os.urandom(32))


def test_flush_block_device_names_the_ioctl_when_it_fails() -> None:
    with pytest.raises(OSError, match="BLKFLSBUF"):
        syscalls.flush_block_device("/dev/null")
