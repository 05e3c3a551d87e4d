"""End to end: exec, attach and interactive TTYs in real microVMs under QEMU."""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import Cli
from tests.test_e2e_run import console_of, one_line_error, ps, wait_for

pytestmark = pytest.mark.e2e


def start_sleeper(cli: Cli, name: str, *extra: str) -> None:
    out = cli("run", "-d", "--name", name, *extra, "hello", "sh", "-c", "echo ready; exec sleep 600")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: "ready" in cli("logs", name).stdout, 60, "the container to start",
             lambda: console_of(cli, name))


def test_exec_output_exit_codes_and_overrides(cli: Cli) -> None:
    start_sleeper(cli, "box")
    out = cli("exec", "box", "echo", "hi")
    assert (out.returncode, out.stdout) == (0, "hi\n"), out.stderr
    out = cli("exec", "box", "sh", "-c", "echo to-err >&2; exit 3")
    assert (out.returncode, out.stdout, out.stderr) == (3, "", "to-err\n")
    out = cli("exec", "-e", "GREETING=salut", "-u", "alice", "-w", "/tmp", "box", "sh", "-c",
              'echo "$GREETING $(id -u) $(pwd)"')
    assert (out.returncode, out.stdout) == (0, "salut 1000 /tmp\n"), out.stderr
    out = subprocess.run(cli.argv("exec", "-i", "box", "sh", "-c", "tr a-z A-Z; exit 4"), input="piped\n",
                         env=cli.env(), capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout) == (4, "PIPED\n"), out.stderr
    out = cli("exec", "-d", "box", "sh", "-c", "echo detached > /tmp/mark")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: cli("exec", "box", "cat", "/tmp/mark").stdout == "detached\n", 60, "the detached exec")
    [row] = ps(cli)
    assert row["State"] == "running"


def test_exec_bad_input_is_one_line_and_the_vm_keeps_running(cli: Cli) -> None:
    start_sleeper(cli, "box")
    out = cli("exec", "box", "no-such-command")
    assert out.returncode == 127 and "executable file not found" in one_line_error(out.stderr)
    out = cli("exec", "-u", "nobody-here", "box", "true")
    assert out.returncode == 126 and "unable to find user nobody-here" in one_line_error(out.stderr)
    out = cli("exec", "box", "/etc/passwd")
    assert out.returncode == 126 and "permission denied" in one_line_error(out.stderr)
    out = cli("exec", "no-such-box", "true")
    assert out.returncode != 0 and "no such container" in one_line_error(out.stderr).lower()
    assert cli("exec", "box", "true").returncode == 0
    [row] = ps(cli)
    assert row["State"] == "running"
    assert cli("stop", "-t", "1", "box").returncode == 0
    out = cli("exec", "box", "true")
    assert out.returncode == 125 and "is not running" in one_line_error(out.stderr)


def test_concurrent_execs_in_one_vm(cli: Cli) -> None:
    start_sleeper(cli, "box")
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(
            lambda i: cli("exec", "box", "sh", "-c", f"sleep 1; echo {i}; exit {i}", timeout=300), range(6)))
    assert [(r.returncode, r.stdout) for r in results] == [(i, f"{i}\n") for i in range(6)], \
        [r.stderr for r in results]


def test_exec_it_has_a_real_terminal_resize_and_ctrl_c(cli: Cli) -> None:
    pexpect = pytest.importorskip("pexpect")
    start_sleeper(cli, "box")
    child = pexpect.spawn(cli.argv("exec", "-it", "box", "sh")[0], cli.argv("exec", "-it", "box", "sh")[1:],
                          env=cli.env(), dimensions=(30, 100), timeout=60, encoding="utf-8")
    try:
        child.expect_exact("# ")
        child.sendline("test -t 0 && stty size")
        child.expect_exact("30 100")
        child.setwinsize(40, 120)
        child.sendline("stty size")
        child.expect_exact("40 120")
        child.expect_exact("# ")
        # Quoting keeps the echoed command line from matching; the job is in the foreground once it prints.
        child.sendline("sh -c 'echo sleep\"\"ing; exec sleep 600'")
        child.expect_exact("sleeping")
        child.sendcontrol("c")
        child.expect_exact("# ")
        child.sendline("echo status=$?")
        child.expect_exact("status=130")
        child.sendline("exit 5")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 5, child.before


def test_run_it_shell_and_attach(cli: Cli) -> None:
    pexpect = pytest.importorskip("pexpect")
    argv = cli.argv("run", "-it", "--name", "shell", "hello", "sh")
    child = pexpect.spawn(argv[0], argv[1:], env=cli.env(), dimensions=(24, 80), timeout=60, encoding="utf-8")
    try:
        child.expect_exact("# ")
        child.sendline("echo $((6 * 7))")
        child.expect_exact("42")
        child.sendline("exit 3")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 3, child.before
    out = cli("attach", "shell")
    assert out.returncode != 0 and "stopped container" in one_line_error(out.stderr)
    out = subprocess.run(cli.argv("run", "-i", "--rm", "hello", "sh", "-c", "read line; echo got $line"),
                         input="piped\n", env=cli.env(), capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout) == (0, "got piped\n"), out.stderr


def test_attach_sees_output_and_exit(cli: Cli) -> None:
    out = cli("run", "-d", "-i", "--name", "echoer", "hello", "sh", "-c", "echo ready; read line; echo got $line")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: "ready" in cli("logs", "echoer").stdout, 60, "ready", lambda: console_of(cli, "echoer"))
    attached = subprocess.Popen(cli.argv("attach", "echoer"), env=cli.env(), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = attached.communicate("hello-attach\n", timeout=120)
    assert (attached.returncode, stdout) == (0, "got hello-attach\n"), stderr


@pytest.mark.parametrize("victim", ["monitor", "vmm"])
def test_sigkill_under_a_running_exec_ends_it_with_an_error(cli: Cli, victim: str) -> None:
    import signal

    from tests.test_e2e_run import _pid_of

    start_sleeper(cli, "box")
    execed = cli.spawn("exec", "box", "sh", "-c", "echo go; exec sleep 600")
    assert execed.stdout is not None
    assert execed.stdout.readline() == "go\n"
    os.kill(_pid_of(cli, "box", victim), signal.SIGKILL)
    try:
        code = execed.wait(timeout=60)
    finally:
        execed.kill()
    assert code != 0
    if victim == "monitor":
        assert "monitor went away" in one_line_error(execed.stderr.read() if execed.stderr else "")
    assert cli("rm", "-f", "box").returncode == 0
