"""End to end with a hostile guest: real microVMs under QEMU whose PID 1, after ``start``, is a script from the
test image (tests/hostile_guest.py) that owns the agent channel. The host must validate, bound and survive.

Run one file at a time: ``pytest -m e2e -x -q -ra tests/test_e2e_hostile.py --timeout 900``.
"""

from __future__ import annotations

import json
import os
import re
import select
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from micropod.vmm.factory import HOSTILE_GUEST_ENV
from tests import hostile_guest
from tests.conftest import Cli
from tests.test_e2e_run import console_of, ps, wait_for

pytestmark = pytest.mark.e2e

WAIT = 120.0  # every wait on a VM is bounded by this (TCG on a shared 2-core machine is slow)
RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
CONSOLE_CAP = 8 << 20  # "a few MiB": the bound console.log must stay under, whatever the guest writes
CONSOLE_FLOOD = CONSOLE_CAP * 3 // 2


@dataclass
class HostileCli(Cli):
    """micropod with the handover switch on: the VMs it boots hand their channel to the image's script."""

    def env(self) -> dict[str, str]:
        return {**super().env(), HOSTILE_GUEST_ENV: "1"}


@pytest.fixture
def hostile(cli: Cli, tmp_path: Path) -> Iterator[HostileCli]:
    runner = HostileCli(cli.root)
    layout = tmp_path / "hostile-layout"
    hostile_guest.build_image(layout)
    loaded = runner("load", "-i", str(layout))
    assert loaded.returncode == 0, loaded.stderr
    yield runner


def run_detached(cli: HostileCli, name: str, *args: str) -> Path:
    """``run -d`` the script with ``args``, wait for its ``ready``; returns the VM's directory."""
    out = cli("run", "-d", "--name", name, "hostile", hostile_guest.SCRIPT, *args)
    assert out.returncode == 0, out.stderr
    vm_dir = cli.root / "vms" / out.stdout.strip()
    wait_for(lambda: "ready" in cli("logs", name).stdout, WAIT, f"{name}'s ready", lambda: tails(cli, name, vm_dir))
    return vm_dir


def tails(cli: Cli, name: str, vm_dir: Path) -> str:
    monitor_log = vm_dir / "monitor.log"
    text = monitor_log.read_text(errors="replace")[-3000:] if monitor_log.exists() else "(no monitor.log)"
    return f"--- console ---\n{console_of(cli, name)}\n--- monitor.log ---\n{text}"


def assert_escaped(text: str) -> None:
    """micropod's own messages quote the guest with control characters escaped."""
    assert not RAW_CONTROL.search(text), repr(text)


def state(cli: Cli, name: str) -> str:
    return next(str(row["State"]) for row in ps(cli) if row["Names"] == name)


def monitor_pid(root: Path) -> int | None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            # a monitor its state root's forker made has the forker's argv, and a name of its own
            forked = b"micropod.monitor.forker" in argv and \
                Path(f"/proc/{entry}/comm").read_text() == "micropod-mon\n"
        except OSError:
            continue
        if (b"micropod.monitor" in argv or forked) and os.fsencode(root) in argv:
            return int(entry)
    return None


def read_line(fd: int, timeout: float) -> bytes:
    """One line from ``fd`` within ``timeout`` seconds (b"" at its end)."""
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no line within {timeout}s; got {line!r}")
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    return line


def memory_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def test_malformed_messages_are_refused_one_line_each_and_the_container_stays_manageable(
        hostile: HostileCli, tmp_path: Path) -> None:
    vm_dir = run_detached(hostile, "bad", "malformed")
    monitor_log = vm_dir / "monitor.log"
    bad = len(hostile_guest.bad_messages("main"))
    wait_for(lambda: "guest log line" in monitor_log.read_text(errors="replace"), WAIT, "the guest's log line",
             lambda: tails(hostile, "bad", vm_dir))
    text = monitor_log.read_text(errors="replace")
    assert text.count("refused a message from the guest") == bad, text
    assert "\\x1b]0;pwned\\x07" in text
    assert_escaped(text)
    assert state(hostile, "bad") == "running"  # a huge exit code ended nothing

    stats = hostile("stats", "--no-stream", "bad", timeout=WAIT)  # the guest answers with 1e400
    assert "Traceback" not in stats.stderr, stats.stderr
    assert_escaped(stats.stdout + stats.stderr)
    assert state(hostile, "bad") == "running"

    copy = hostile("cp", "bad:/etc", str(tmp_path / "out"), timeout=WAIT)  # the guest's error is full of escapes
    assert copy.returncode != 0 and "pwned" in copy.stderr, copy.stderr
    assert "Traceback" not in copy.stderr
    assert_escaped(copy.stderr)

    # stop's SIGTERM is answered with a 4 GiB frame header and noise: the channel is closed, the VM killed.
    stopped = hostile("stop", "-t", "5", "bad", timeout=WAIT)
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: state(hostile, "bad") == "exited", WAIT, "the exit", lambda: tails(hostile, "bad", vm_dir))
    assert "the agent channel broke" in monitor_log.read_text(errors="replace")
    listing = hostile("ps", "-a")
    assert listing.returncode == 0 and "bad" in listing.stdout
    assert_escaped(listing.stdout + hostile("inspect", "bad").stdout)
    removed = hostile("rm", "bad")
    assert removed.returncode == 0, removed.stderr


def test_a_flood_reaches_a_slow_attached_client_whole_with_the_monitor_bounded(hostile: HostileCli) -> None:
    total = 32 << 20
    client = subprocess.Popen(hostile.argv("run", "--rm", "hostile", hostile_guest.SCRIPT, "flood", str(total)),
                              env=hostile.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert client.stdout is not None
    received = 0
    mismatch: int | None = None
    first_rss: int | None = None
    peak = 0
    reads = 0
    try:
        while True:
            slow = received < (4 << 20)
            chunk = os.read(client.stdout.fileno(), 4096 if slow else 1 << 16)
            if not chunk:
                break
            if mismatch is None and chunk != hostile_guest.pattern(received, len(chunk)):
                mismatch = received
            received += len(chunk)
            reads += 1
            if reads % 32 == 0:
                pid = monitor_pid(hostile.root)
                if pid is not None:
                    rss, hwm = memory_kib(pid, "VmRSS"), memory_kib(pid, "VmHWM")
                    if first_rss is None:
                        first_rss = rss
                    peak = max(peak, hwm or 0)
            if slow:
                threading.Event().wait(0.002)  # a slow terminal: the guest writes far faster than this
        code = client.wait(WAIT)
    finally:
        client.kill()
    stderr = client.stderr.read().decode(errors="replace") if client.stderr else ""
    assert code == 0, stderr
    assert (received, mismatch) == (total, None), stderr
    assert first_rss is not None
    growth_mib = (peak - first_rss) / 1024
    assert growth_mib < 12, f"the monitor grew by {growth_mib:.1f} MiB while {total >> 20} MiB went through"


@pytest.mark.parametrize("how", [("stop", "-t", "1"), ("kill",)], ids=["stop", "kill"])
def test_a_guest_that_stops_reading_cannot_block_stop_or_kill(hostile: HostileCli, how: tuple[str, ...]) -> None:
    client = subprocess.Popen(hostile.argv("run", "-i", "--name", "deaf", "hostile", hostile_guest.SCRIPT, "deaf"),
                              env=hostile.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    assert client.stdin is not None and client.stdout is not None
    written = [0]

    def pour() -> None:  # stdin the guest never reads, far more than every buffer on the way holds
        block = b"y" * (1 << 16)
        try:
            for _ in range(1024):
                assert client.stdin is not None
                client.stdin.write(block)
                written[0] += len(block)
        except (BrokenPipeError, ValueError, OSError):
            pass

    pourer = threading.Thread(target=pour, daemon=True)
    try:
        assert read_line(client.stdout.fileno(), WAIT) == b"ready\n", client.poll()
        pourer.start()
        wait_for(lambda: written[0] >= 1 << 20, WAIT, "1 MiB of stdin accepted on the way to the guest")
        done = hostile(*how, "deaf", timeout=WAIT)
        assert done.returncode == 0, done.stderr
        code = client.wait(WAIT)
        assert code == 137, client.stderr.read() if client.stderr else ""
        [row] = ps(hostile)
        assert row["State"] == "exited" and row["ExitCode"] == 137
        assert written[0] < 64 << 20  # the guest really took nothing: the stream stalled
    finally:
        client.kill()
        pourer.join(10)


def test_a_console_flood_stays_under_the_cap_and_its_tail_is_escaped(hostile: HostileCli) -> None:
    out = hostile("run", "--name", "loud", "hostile", hostile_guest.SCRIPT, "console-flood", str(CONSOLE_FLOOD),
                  timeout=900)
    assert out.returncode != 0 and out.stdout == "flooding\n", out.stderr[-2000:]
    assert_escaped(out.stderr)
    inspect = hostile("inspect", "loud")
    assert inspect.returncode == 0, inspect.stderr
    console = Path(json.loads(inspect.stdout)[0]["VM"]["ConsoleLog"])
    assert console.stat().st_size <= CONSOLE_CAP, f"console.log is {console.stat().st_size} bytes"
    assert hostile("rm", "loud").returncode == 0


def test_cp_out_of_a_tar_with_a_hard_link_to_a_host_file_leaves_it_untouched(hostile: HostileCli,
                                                                             tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("the host's own file\n")
    victim.chmod(0o600)
    before = victim.stat()
    run_detached(hostile, "evil", "evil-tar", str(victim))
    dest = tmp_path / "dest"
    dest.mkdir()
    copy = hostile("cp", "evil:/x", str(dest), timeout=WAIT)
    assert "Traceback" not in copy.stderr, copy.stderr
    assert_escaped(copy.stderr)
    after = victim.stat()
    assert victim.read_text() == "the host's own file\n"
    assert (after.st_ino, after.st_nlink, stat.S_IMODE(after.st_mode), after.st_uid, after.st_mtime_ns) == (
        before.st_ino, 1, 0o600, before.st_uid, before.st_mtime_ns)
    for path in dest.rglob("*"):
        st = path.lstat()
        assert st.st_ino != before.st_ino
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID)
    assert state(hostile, "evil") == "running"
    assert hostile("rm", "-f", "evil", timeout=WAIT).returncode == 0
