"""End to end: real microVMs under QEMU, driven through the CLI as a user would."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import Cli

pytestmark = pytest.mark.e2e


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "expected an error message"
    assert "Traceback" not in stderr, stderr
    return lines[0]


def wait_for(predicate, timeout: float, what: str, detail=lambda: "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{detail()}")
        time.sleep(0.1)


def ps(cli: Cli) -> list[dict[str, object]]:
    out = cli("ps", "-a", "--format", "json")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def console_of(cli: Cli, name: str) -> str:
    out = cli("inspect", name)
    if out.returncode != 0:
        return out.stderr
    console = Path(json.loads(out.stdout)[0]["VM"]["ConsoleLog"])
    return console.read_text(errors="replace")[-3000:] if console.exists() else "(no console log)"


def test_hello_greets_from_inside_the_vm(cli: Cli) -> None:
    out = cli("run", "--rm", "hello")
    assert out.returncode == 0, out.stderr
    assert "Hello from micropod" in out.stdout
    assert "microVM" in out.stdout
    assert ps(cli) == []


def test_echo_and_exit_codes(cli: Cli) -> None:
    out = cli("run", "--rm", "hello", "echo", "hi")
    assert (out.returncode, out.stdout) == (0, "hi\n"), out.stderr
    out = cli("run", "--rm", "hello", "sh", "-c", "exit 7")
    assert out.returncode == 7, out.stderr
    out = cli("run", "--rm", "hello", "sh", "-c", "echo to-err >&2")
    assert out.stderr == "to-err\n" and out.stdout == ""


def test_missing_command_is_127_with_one_line(cli: Cli) -> None:
    out = cli("run", "--rm", "hello", "no-such-command")
    assert out.returncode == 127
    assert "executable file not found" in one_line_error(out.stderr)
    assert ps(cli) == []


def test_env_user_workdir_and_resources(cli: Cli) -> None:
    out = cli("run", "--rm", "-e", "GREETING=bonjour", "-u", "alice", "-w", "/tmp", "--cpus", "2",
              "--memory", "192M", "hello", "sh", "-c", 'echo "$GREETING $(id -u) $(pwd) $(nproc)"; '
              "grep MemTotal /proc/meminfo")
    assert out.returncode == 0, out.stderr
    first, meminfo = out.stdout.splitlines()
    assert first == "bonjour 1000 /tmp 2"
    total_kib = int(meminfo.split()[1])
    assert 100_000 < total_kib <= 192 * 1024


def test_writes_land_in_the_overlay_not_the_image(cli: Cli) -> None:
    out = cli("run", "--name", "writer", "hello", "sh", "-c", "echo data > /etc/new && rm /bin/ls && cat /etc/new")
    assert (out.returncode, out.stdout) == (0, "data\n"), out.stderr
    fresh = cli("run", "--rm", "hello", "sh", "-c", "test ! -e /etc/new && test -e /bin/ls && echo clean")
    assert fresh.stdout == "clean\n", fresh.stderr


def test_detached_lifecycle_like_docker(cli: Cli) -> None:
    out = cli("run", "-d", "--name", "web", "hello", "sh", "-c", "echo started; exec sleep 600")
    assert out.returncode == 0, out.stderr
    vm_id = out.stdout.strip()
    assert len(vm_id) == 64
    [row] = ps(cli)
    assert row["Names"] == "web" and row["State"] == "running"
    assert str(row["Status"]).startswith("Up")
    listing = cli("ps")
    assert "web" in listing.stdout and vm_id[:12] in listing.stdout
    wait_for(lambda: cli("logs", "web").stdout == "started\n", 60, "the log line",
             lambda: console_of(cli, "web"))
    dup = cli("run", "-d", "--name", "web", "hello", "true")
    assert dup.returncode != 0 and "already in use" in one_line_error(dup.stderr)
    busy = cli("rm", "web")
    assert busy.returncode != 0 and "stop" in one_line_error(busy.stderr)
    stopped = cli("stop", "-t", "5", "web")
    assert stopped.returncode == 0 and stopped.stdout.strip() == "web", stopped.stderr
    [row] = ps(cli)
    assert row["State"] == "exited" and row["ExitCode"] == 137  # PID 1 without a TERM handler: killed, as in docker
    assert cli("ps").stdout.count("\n") == 1  # only the header: not running
    assert cli("logs", "web").stdout == "started\n"
    assert cli("rm", "web").returncode == 0
    assert ps(cli) == []
    assert cli("rm", "web").returncode != 0
    assert cli("rm", "-f", "web").returncode == 0
    assert not any((cli.root / "vms").iterdir())


def test_stop_timeout_kills_a_process_that_ignores_sigterm(cli: Cli) -> None:
    out = cli("run", "-d", "--name", "stubborn", "hello", "sh", "-c", "trap '' TERM; echo ready; sleep 600")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: "ready" in cli("logs", "stubborn").stdout, 60, "ready")
    assert cli("stop", "-t", "1", "stubborn").returncode == 0
    [row] = ps(cli)
    assert row["ExitCode"] == 137


def test_eight_concurrent_runs(cli: Cli) -> None:
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: cli("run", "--rm", "hello", "true", timeout=600), range(8)))
    assert [r.returncode for r in results] == [0] * 8, [r.stderr for r in results]
    assert ps(cli) == []


def test_bad_input_gets_one_line_and_leaves_nothing(cli: Cli) -> None:
    cases = [
        (["run", "--rm", "nosuchimage"], "No such image"),
        (["run", "--rm", "Bad:Ref!"], "invalid"),
        (["run", "--rm", "--memory", "lots", "hello"], "--memory"),
        (["run", "--rm", "--cpus", "0", "hello"], "--cpus"),
        (["run", "--rm", "--vmm", "xen", "hello"], "--vmm"),
        (["run", "--rm", "--name", "bad name!", "hello"], "invalid container name"),
    ]
    for args, expected in cases:
        out = cli(*args)
        assert out.returncode == 125, (args, out.stderr)
        assert expected.lower() in one_line_error(out.stderr).lower(), (args, out.stderr)
    assert ps(cli) == []
    assert not any((cli.root / "vms").iterdir())


def test_missing_vmm_and_kernel_point_to_doctor(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROPOD_QEMU", str(tmp_path / "no-qemu"))
    out = cli("run", "--rm", "--vmm", "qemu", "hello", "true")
    assert out.returncode == 125 and "doctor" in one_line_error(out.stderr)
    monkeypatch.delenv("MICROPOD_QEMU")
    monkeypatch.setenv("MICROPOD_CACHE", str(tmp_path / "empty-cache"))
    out = cli("run", "--rm", "hello", "true")
    assert out.returncode == 125 and "doctor" in one_line_error(out.stderr)
    assert ps(cli) == []


def test_guest_that_fails_to_boot_shows_the_console(cli: Cli, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    garbage = tmp_path / "system.sqfs"
    garbage.write_bytes(b"\0" * 65536)
    monkeypatch.setenv("MICROPOD_SYSTEM_IMAGE", str(garbage))
    out = cli("run", "--rm", "--boot-timeout", "60", "hello", "true")
    assert out.returncode == 125
    assert "Traceback" not in out.stderr
    assert "console" in out.stderr.lower() and ("panic" in out.stderr.lower() or "VFS" in out.stderr)
    assert ps(cli) == []


def _pid_of(cli: Cli, name: str, which: str) -> int:
    from micropod.state import StateStore

    record = StateStore(cli.root / "state.db").find(name)
    pid = record.monitor_pid if which == "monitor" else record.vmm_pid
    assert pid
    return pid


@pytest.mark.parametrize("victim", ["monitor", "vmm"])
def test_sigkill_of_monitor_or_vmm_is_reported_and_rm_cleans(cli: Cli, victim: str) -> None:
    out = cli("run", "-d", "--name", "victim", "hello", "sleep", "600")
    assert out.returncode == 0, out.stderr
    os.kill(_pid_of(cli, "victim", victim), signal.SIGKILL)
    if victim == "monitor":
        wait_for(lambda: "monitor lost" in cli("ps").stdout, 30, "ps to show the lost monitor")
    else:
        wait_for(lambda: ps(cli)[0]["State"] == "exited", 30, "the monitor to record the VM's death")
        assert ps(cli)[0]["ExitCode"] == 137
    removed = cli("rm", "-f", "victim")
    assert removed.returncode == 0, removed.stderr
    assert ps(cli) == []
    assert not any((cli.root / "vms").iterdir())
