"""End to end: stop/kill/restart/start, restart policies and logs, in real microVMs under QEMU."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Cli
from tests.test_e2e_exec import start_sleeper
from tests.test_e2e_run import _pid_of, console_of, one_line_error, ps, wait_for
from tests.test_guestram import ended

pytestmark = pytest.mark.e2e


def row(cli: Cli, name: str) -> dict[str, object]:
    [found] = [r for r in ps(cli) if r["Names"] == name]
    return found


def test_kill_with_a_signal_and_stop_signal(cli: Cli) -> None:
    out = cli("run", "-d", "--name", "trap", "hello", "sh", "-c",
              "trap 'echo got-usr1' USR1; echo ready; while true; do sleep 1; done")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: "ready" in cli("logs", "trap").stdout, 60, "ready", lambda: console_of(cli, "trap"))
    assert cli("kill", "-s", "USR1", "trap").returncode == 0
    wait_for(lambda: "got-usr1" in cli("logs", "trap").stdout, 60, "the trapped signal")
    assert row(cli, "trap")["State"] == "running"
    bad = cli("kill", "-s", "NOPE", "trap")
    assert bad.returncode != 0 and "invalid signal" in one_line_error(bad.stderr)
    assert cli("kill", "trap").returncode == 0
    assert row(cli, "trap")["ExitCode"] == 137
    out = cli("kill", "trap")
    assert out.returncode != 0 and "not running" in one_line_error(out.stderr)


def test_start_and_restart_keep_the_writable_layer(cli: Cli) -> None:
    out = cli("run", "--name", "keeper", "hello", "sh", "-c", "echo kept > /etc/state")
    assert out.returncode == 0, out.stderr
    assert cli("start", "keeper").returncode == 0
    wait_for(lambda: row(cli, "keeper")["State"] == "exited", 60, "the second run")
    start_sleeper(cli, "svc")
    assert cli("exec", "svc", "sh", "-c", "echo mine > /root/file").returncode == 0
    restarted = cli("restart", "-t", "1", "svc")
    assert restarted.returncode == 0, restarted.stderr
    assert row(cli, "svc")["State"] == "running"
    out = cli("exec", "svc", "cat", "/root/file")
    assert (out.returncode, out.stdout) == (0, "mine\n"), out.stderr
    busy = cli("start", "svc")
    assert busy.returncode != 0 and "already running" in one_line_error(busy.stderr)


def test_restart_policy_on_failure_counts_and_stops(cli: Cli) -> None:
    out = cli("run", "-d", "--name", "flaky", "--restart", "on-failure:2", "hello", "sh", "-c",
              "echo run >> /runs; echo boot; exit 3")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: row(cli, "flaky")["State"] == "exited", 120, "the retries to run out",
             lambda: console_of(cli, "flaky"))
    final = row(cli, "flaky")
    assert (final["ExitCode"], final["RestartCount"]) == (3, 2)
    assert cli("logs", "flaky").stdout == "boot\n" * 3
    inspect = json.loads(cli("inspect", "flaky").stdout)[0]
    assert inspect["RestartCount"] == 2
    assert inspect["HostConfig"]["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 2}
    bad = cli("run", "--rm", "--restart", "always", "hello", "true")
    assert bad.returncode == 125 and "conflicting" in one_line_error(bad.stderr).lower()
    bad = cli("run", "--restart", "sometimes", "hello", "true")
    assert bad.returncode == 125 and "--restart" in one_line_error(bad.stderr)


def test_restart_always_survives_a_vmm_sigkill_until_stopped(cli: Cli) -> None:
    start_sleeper(cli, "phoenix", "--restart", "always")
    first = _pid_of(cli, "phoenix", "vmm")
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: int(str(row(cli, "phoenix")["RestartCount"])) >= 1 and row(cli, "phoenix")["State"] == "running"
             and _pid_of(cli, "phoenix", "vmm") != first, 120, "the VM to be rebooted",
             lambda: console_of(cli, "phoenix"))
    assert "Up" in str(row(cli, "phoenix")["Status"])
    assert cli("exec", "phoenix", "true").returncode == 0
    assert cli("stop", "-t", "1", "phoenix").returncode == 0
    assert row(cli, "phoenix")["State"] == "exited"


def test_logs_tail_timestamps_since_until_and_rotation(cli: Cli) -> None:
    out = cli("run", "--name", "chatty", "--log-opt", "max-size=2k", "--log-opt", "max-file=3", "hello", "sh", "-c",
              "i=0; while [ $i -lt 200 ]; do echo line-$i; i=$((i+1)); done")
    assert out.returncode == 0, out.stderr
    logs = cli("logs", "chatty").stdout.splitlines()
    assert logs and logs[-1] == "line-199"
    assert logs == [f"line-{i}" for i in range(200 - len(logs), 200)]  # in order, oldest rotated away
    vm_dir = cli.root / "vms" / str(json.loads(cli("inspect", "chatty").stdout)[0]["Id"])
    assert (vm_dir / "container.log.1").exists() and not (vm_dir / "container.log.3").exists()
    assert cli("logs", "--tail", "2", "chatty").stdout == "line-198\nline-199\n"
    stamped = cli("logs", "-t", "--tail", "1", "chatty").stdout
    assert stamped.endswith("Z line-199\n") and stamped[:4].isdigit()
    assert cli("logs", "--since", "10m", "chatty").stdout.splitlines() == logs
    assert cli("logs", "--until", "10m", "chatty").stdout == ""
    assert cli("logs", "--since", str(time.time() + 60), "chatty").stdout == ""
    assert cli("logs", "--since", "2000-01-01T00:00:00Z", "chatty").stdout.splitlines() == logs
    bad = cli("logs", "--since", "yesterday", "chatty")
    assert bad.returncode == 125 and "invalid time" in one_line_error(bad.stderr)


def test_logs_follow_ends_with_the_container(cli: Cli) -> None:
    out = cli("run", "-d", "--name", "tick", "hello", "sh", "-c", "echo ready; read x; echo done")
    assert out.returncode == 0, out.stderr
    follower = cli.spawn("logs", "-f", "tick")
    wait_for(lambda: "ready" in cli("logs", "tick").stdout, 60, "ready")
    assert cli("stop", "-t", "1", "tick").returncode == 0
    stdout, _ = follower.communicate(timeout=60)
    assert stdout.startswith("ready\n")


def test_syslog_from_dev_log_lands_in_the_container_log(cli: Cli) -> None:
    out = cli("run", "--name", "syslogger", "hello", "sh", "-c", "busybox logger -t app hi-there; echo out")
    assert (out.returncode, out.stdout) == (0, "out\n"), out.stderr
    logs = cli("logs", "syslogger")
    assert logs.stdout == "out\n"
    assert "app" in logs.stderr and logs.stderr.rstrip().endswith("hi-there"), logs.stderr
    vm_id = json.loads(cli("inspect", "syslogger").stdout)[0]["Id"]
    entries = [json.loads(line) for line in (cli.root / "vms" / vm_id / "container.log").read_text().splitlines()]
    assert [e["stream"] for e in entries if "hi-there" in e["log"]] == ["syslog"]


def test_system_df_and_prune(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROPOD_SNAPSHOT_DIR", str(tmp_path / "snapshots"))  # pruned here, not the shared one
    assert cli("run", "--name", "done", "hello", "true").returncode == 0
    start_sleeper(cli, "alive")
    usage = {r["Type"]: r for r in map(json.loads, cli("system", "df", "--format", "json").stdout.splitlines())}
    assert (usage["Containers"]["TotalCount"], usage["Containers"]["Active"]) == (2, 1)
    assert usage["Rootfs cache"]["TotalCount"] == 1 and usage["Rootfs cache"]["Reclaimable"] == "0B"
    assert (usage["Boot snapshots"]["TotalCount"], usage["Boot snapshots"]["Active"]) == (1, 1), usage
    holder = json.loads(next((tmp_path / "snapshots").glob("*.holder")).read_text())["pid"]
    out = cli("system", "prune", "-f")
    assert out.returncode == 0, out.stderr
    assert "Deleted Containers:" in out.stdout and "rootfs" not in out.stdout  # the running one still uses it
    assert ended(holder)
    # the snapshot goes, and its guest RAM's holder, while the VM restored from it keeps its own mapping
    assert "Deleted boot snapshots:" in out.stdout and not list((tmp_path / "snapshots").glob("[!.]*"))
    assert [r["Names"] for r in ps(cli)] == ["alive"]
    assert cli("exec", "alive", "true").returncode == 0
    assert cli("rm", "-f", "alive").returncode == 0
    out = cli("system", "prune", "-f")
    assert "Deleted rootfs bases:" in out.stdout, out.stdout
    again = cli("run", "--rm", "hello", "echo", "rebuilt")
    assert again.stdout == "rebuilt\n", again.stderr


def test_stats_measures_inside_the_vm(cli: Cli) -> None:
    start_sleeper(cli, "idle")
    out = cli("run", "-d", "--name", "busy", "--memory", "192M", "hello", "sh", "-c", "while true; do :; done")
    assert out.returncode == 0, out.stderr
    rows = {r["Name"]: r for r in map(json.loads, cli("stats", "--no-stream", "--format", "json").stdout.splitlines())}
    assert set(rows) == {"idle", "busy"}
    assert float(str(rows["busy"]["CPUPerc"]).rstrip("%")) > float(str(rows["idle"]["CPUPerc"]).rstrip("%"))
    assert str(rows["busy"]["MemUsage"]).endswith("MB") and rows["busy"]["PIDs"] == "1"
    table = cli("stats", "--no-stream", "idle")
    assert table.returncode == 0 and "CPU %" in table.stdout and "idle" in table.stdout


def test_cp_in_and_out_of_a_running_vm(cli: Cli, tmp_path: Path) -> None:
    out = cli("run", "-d", "--name", "files", "hello", "sh", "-c",
              "mkdir -p /srv/d && echo a > /srv/d/a && ln -s ../../../etc /srv/escape && echo ready && exec sleep 600")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: "ready" in cli("logs", "files").stdout, 60, "ready", lambda: console_of(cli, "files"))
    assert cli("cp", "files:/srv/d", str(tmp_path)).returncode == 0
    assert (tmp_path / "d" / "a").read_text() == "a\n"
    assert cli("cp", "files:/srv/d/a", str(tmp_path / "renamed")).returncode == 0
    assert (tmp_path / "renamed").read_text() == "a\n"
    (tmp_path / "up.txt").write_text("up\n")
    assert cli("cp", str(tmp_path / "up.txt"), "files:/tmp/").returncode == 0
    assert cli("cp", str(tmp_path / "up.txt"), "files:/tmp/other").returncode == 0
    assert cli("exec", "files", "cat", "/tmp/up.txt", "/tmp/other").stdout == "up\nup\n"
    for args, words in [(("files:/nope", str(tmp_path)), "Could not find"),
                        (("files:/srv/escape/passwd", str(tmp_path)), "outside the container"),
                        ((str(tmp_path / "up.txt"), "files:/srv/escape/evil"), "outside the container"),
                        ((str(tmp_path / "missing"), "files:/tmp/"), "could not find")]:
        bad = cli("cp", *args)
        assert bad.returncode != 0 and words in one_line_error(bad.stderr), (args, bad.stderr)
    assert row(cli, "files")["State"] == "running"
    assert cli("stop", "-t", "1", "files").returncode == 0
    # A stopped container: its VM boots for the copy with nothing started, and is powered off after.
    (tmp_path / "late.txt").write_text("late\n")
    out = cli("cp", str(tmp_path / "late.txt"), "files:/srv/d/")
    assert out.returncode == 0, out.stderr
    out = cli("cp", "files:/srv/d/late.txt", str(tmp_path / "back.txt"))
    assert out.returncode == 0 and (tmp_path / "back.txt").read_text() == "late\n", out.stderr
    bad = cli("cp", "files:/nope", str(tmp_path))
    assert bad.returncode != 0 and "Could not find" in one_line_error(bad.stderr)
    final = row(cli, "files")
    assert (final["State"], final["ExitCode"]) == ("exited", 137)  # sleep as PID 1 ignores TERM, as in docker
    assert cli("start", "files").returncode == 0
    assert cli("exec", "files", "cat", "/srv/d/late.txt", "/tmp/up.txt").stdout == "late\nup\n"
