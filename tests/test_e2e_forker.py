"""Monitors forked from the state root's pre-imported forker (micropod/monitor/forker.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from micropod.monitor import forker
from micropod.paths import StateRoot
from tests.conftest import Cli
from tests.test_e2e_run import wait_for

pytestmark = pytest.mark.e2e

WAIT = 300


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def monitor_of(cli: Cli, name: str) -> int:
    import sqlite3

    with sqlite3.connect(cli.root / "state.db") as db:
        row = db.execute("SELECT monitor_pid FROM vms WHERE name = ?", (name,)).fetchone()
    return int(row[0])


def test_monitors_are_forked_by_one_forker_whose_death_ends_no_vm(cli: Cli) -> None:
    for name in ("one", "two"):
        assert cli("run", "-d", "--name", name, "hello", "sleep", "600", timeout=WAIT).returncode == 0
    one, two = monitor_of(cli, "one"), monitor_of(cli, "two")
    parent = parent_of(one)
    assert parent == parent_of(two) and parent != 1
    assert Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")[1:4] == [b"-P", b"-m",
                                                                               b"micropod.monitor.forker"]
    assert Path(f"/proc/{parent}/cwd").readlink() == Path("/")
    assert Path(f"/proc/{one}/comm").read_text().strip() == "micropod-mon"
    assert os.stat(cli.root / "forker").st_mode & 0o777 == 0o700
    # crash isolation: the forker dies, every VM it forked a monitor for goes on
    os.kill(parent, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{parent}").exists() or parent_of(one) != parent, 10, "the forker to end")
    done = cli("exec", "one", "echo", "still-here", timeout=WAIT)
    assert (done.returncode, done.stdout) == (0, "still-here\n"), done.stderr
    # and the next run starts a new forker
    assert cli("run", "-d", "--name", "three", "hello", "sleep", "600", timeout=WAIT).returncode == 0
    assert parent_of(monitor_of(cli, "three")) not in (parent, 1)
    assert cli("stop", "-t", "1", "one", "two", "three", timeout=WAIT).returncode == 0


def test_without_the_forker_a_monitor_is_spawned(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROPOD_MONITOR_FORKER", "0")
    out = cli("run", "--name", "plain", "hello", "echo", "spawned", timeout=WAIT)
    assert (out.returncode, out.stdout) == (0, "spawned\n"), out.stderr
    assert not (cli.root / "forker").exists()


def test_a_forker_of_other_code_steps_aside(tmp_path: Path) -> None:
    root = StateRoot(tmp_path / "root")
    forker.forker_dir(root)
    name = forker.context_name()
    server = subprocess.Popen([sys.executable, "-m", "micropod.monitor.forker", str(root.path), name])
    try:
        deadline = time.monotonic() + 30
        while not (root.path / "forker" / name).exists():
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX) as conn, open(os.devnull, "wb") as log:
            conn.connect(str(root.path / "forker" / name))
            request = {"identity": "another micropod", "args": ["--root", str(root.path), "x"], "env": {}}
            socket.send_fds(conn, [json.dumps(request).encode()], [log.fileno()])
            assert json.loads(conn.makefile().readline()) == {"stale": True}
        assert server.wait(10) == 0  # gone: the asking micropod starts a forker of its own code
    finally:
        server.kill()
        server.wait()


def test_a_forker_that_took_the_request_and_never_answered_is_an_error_not_a_second_monitor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forker, "REPLY_TIMEOUT", 0.5)
    root = StateRoot(tmp_path / "root")
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(forker.forker_dir(root) / forker.context_name()))
    silent.listen()
    try:
        with open(os.devnull, "wb") as log, pytest.raises(forker.ForkerError, match="did not answer"):
            forker.fork_monitor(root, ["--root", str(root.path), "x"], {}, log.fileno())
    finally:
        silent.close()
    # nobody listening at all: the caller spawns the monitor itself
    monkeypatch.setattr(forker, "_start", lambda *_: False)
    with open(os.devnull, "wb") as log:
        assert forker.fork_monitor(root, ["--root", str(root.path), "x"], {}, log.fileno()) is None


def test_a_forked_monitor_takes_its_callers_limits_and_nice_not_the_forkers(cli: Cli) -> None:
    """The forker was started by an earlier caller; a monitor it forks gets what a spawned one would have
    inherited from its own caller (forker.process_settings)."""
    assert cli("run", "-d", "--name", "first", "hello", "sleep", "600", timeout=WAIT).returncode == 0
    forker_pid = parent_of(monitor_of(cli, "first"))
    wrapped = ["nice", "-n", "7", "prlimit", "--nofile=777:888", sys.executable, "-m", "micropod", "run", "-d",
               "--name", "second", "hello", "sleep", "600"]
    done = subprocess.run(wrapped, env=cli.env(), capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    second = monitor_of(cli, "second")
    assert parent_of(second) == forker_pid  # forked, by the forker the first run started
    limits = Path(f"/proc/{second}/limits").read_text()
    assert any(line.startswith("Max open files") and line.split()[3:5] == ["777", "888"]
               for line in limits.splitlines()), limits
    assert int(Path(f"/proc/{second}/stat").read_text().rpartition(")")[2].split()[16]) == 7  # its nice
    assert "Max open files            777" not in Path(f"/proc/{forker_pid}/limits").read_text()
    assert cli("rm", "-f", "first", "second", timeout=WAIT).returncode == 0
