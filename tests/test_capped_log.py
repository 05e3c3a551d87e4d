"""The console and VMM output go through a pipe into a log with a cap (micropod/vmm/capped.py)."""

from __future__ import annotations

import contextlib
import stat
import sys
from pathlib import Path

from micropod import proc
from micropod.vmm.capped import CappedLog, backup
from micropod.vmm.qemu import QemuLayout, qemu_argv
from tests.test_qemu import spec as make_spec

WRITER = "import sys\nfor i in range({blocks}):\n    sys.stdout.buffer.write(b'%07d' % i + b'.' * 1017)\n"


def test_a_child_writing_far_past_the_cap_leaves_two_files_under_it_holding_its_last_bytes(tmp_path: Path) -> None:
    path, cap, blocks = tmp_path / "console.log", 64 << 10, 1000  # 1000 KiB through a 64 KiB cap
    log = CappedLog(path, cap)
    try:
        child = proc.spawn([sys.executable, "-c", WRITER.format(blocks=blocks)], stdout=log.write_fd)
    finally:
        log.child_started()
    assert child.wait(60) == 0
    log.settle(10)
    older, newer = backup(path).read_bytes(), path.read_bytes()
    assert 0 < len(newer) <= cap and len(older) <= cap
    stream = b"".join(b"%07d" % i + b"." * 1017 for i in range(blocks))
    assert stream.endswith(older + newer)  # whole, in order: what is kept is the end of the stream
    for kept in (path, backup(path)):
        assert stat.S_IMODE(kept.lstat().st_mode) == 0o600


def test_an_existing_log_counts_toward_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "vmm.log"
    path.write_bytes(b"x" * 1000)
    log = CappedLog(path, 1024)
    try:
        child = proc.spawn([sys.executable, "-c", "print('y' * 99)"], stdout=log.write_fd)
    finally:
        log.child_started()
    child.wait(60)
    log.settle(10)
    assert backup(path).read_bytes() == b"x" * 1000 and path.read_bytes() == b"y" * 99 + b"\n"


def test_a_link_planted_as_the_log_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (tmp_path / "console.log").symlink_to(victim)
    with contextlib.suppress(OSError):
        CappedLog(tmp_path / "console.log", 1024)
    assert victim.read_text() == "keep\n"


def test_qemu_writes_the_console_to_its_stdout_never_to_a_file_of_its_own(tmp_path: Path) -> None:
    argv = qemu_argv(make_spec(tmp_path), Path("/usr/bin/qemu-system-x86_64"), "tcg", QemuLayout(tmp_path))
    chardevs = [argv[i + 1] for i, word in enumerate(argv) if word == "-chardev"]
    assert "stdio,id=console,signal=off" in chardevs
    assert not [c for c in chardevs if c.startswith("file,")]


def test_a_fifo_opened_by_name_is_capped_and_ends_at_the_writers_exit(tmp_path: Path) -> None:
    """Firecracker opens its logger and metrics by path: a named pipe there, copied under the cap."""
    path, fifo, cap, blocks = tmp_path / "vmm.log", tmp_path / "vmm.log.fifo", 64 << 10, 1000
    log = CappedLog(path, cap, fifo=fifo)
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and stat.S_IMODE(fifo.lstat().st_mode) == 0o600
    writer = f"import sys\nsys.stdout = open({str(fifo)!r}, 'wb')\n" + WRITER.replace("sys.stdout.buffer", "sys.stdout")
    child = proc.spawn([sys.executable, "-c", writer.format(blocks=blocks)])
    try:
        assert child.wait(60) == 0
    finally:
        log.child_started()  # the VMM has it open by now: ours goes, and the writer's exit is the EOF
    log.settle(10)
    older, newer = backup(path).read_bytes(), path.read_bytes()
    assert 0 < len(newer) <= cap and len(older) <= cap
    assert b"".join(b"%07d" % i + b"." * 1017 for i in range(blocks)).endswith(older + newer)
