"""Differential tests: the same bundle under runc (first) and under the runtime under test, compared.

For the "runc" parameter the runtime under test is runc itself: the comparison is trivial, and what checks
runc (and the test) is the property asserted next to each comparison, derived from the bundle's config.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.runtime_bundle import (  # noqa: F401  (fixtures)
    CGROUP_PARENT,
    DEFAULT_SPEC,
    Runtime,
    both,
    cap_mask,
    cgroup_dirs,
    cgroup_path,
    cgroup_subtree_fixture,
    freezer_state,
    load_config,
    make_bundle,
    read_line,
    read_until_hangup,
    receive_fd,
    removed,
    runc_fixture,
    runtime_fixture,
    started,
    wait_stopped,
    write_config,
)

pytestmark = pytest.mark.runtime
SPEC_STATE_FIELDS = ("ociVersion", "id", "status", "pid", "bundle", "annotations")
NAMESPACE_LINKS = {"pid": "pid", "network": "net", "ipc": "ipc", "uts": "uts", "mount": "mnt",
                   "cgroup": "cgroup", "user": "user", "time": "time"}


def error_line(done: subprocess.CompletedProcess[str]) -> list[str]:
    return done.stderr.strip().splitlines()


def assert_clean(runtime: Runtime, bundle: Path | None) -> None:
    """No state directory under the runtime's root, and no cgroup of the bundle's (make_bundle names it
    after the bundle, so this holds even when config.json is unreadable)."""
    assert runtime.ids() == [], f"{runtime.name} left state behind: {runtime.ids()}"
    if bundle is not None:
        assert cgroup_dirs(f"{CGROUP_PARENT}/{bundle.name}") == [], f"{runtime.name} left a cgroup behind"


def test_run_prints_and_exits_with_the_process_status(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sh", "-c", "echo hi; exit 3"])

    def observe(rt: Runtime) -> tuple[int, str]:
        with removed(rt, "hi"):
            done = rt.run("run", "--bundle", str(bundle), "hi", stdin=subprocess.DEVNULL)
        assert_clean(rt, bundle)
        return done.returncode, done.stdout

    expected, actual = both(runc, runtime, observe)
    assert actual == expected == (3, "hi\n")


def spec_fields(state: dict[str, Any]) -> dict[str, Any]:
    fields = {k: state[k] for k in SPEC_STATE_FIELDS if k in state}
    assert re.fullmatch(r"\d+\.\d+\.\d+(-[\w.]+)?", fields.pop("ociVersion")), state
    fields["pid"] = "positive" if fields["pid"] > 0 else fields["pid"]
    return fields


def test_lifecycle_and_state(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sleep", "1000"], annotations={"org.example.test": "lifecycle"})

    def observe(rt: Runtime) -> list[dict[str, Any]]:
        states = []
        with removed(rt, "life"):
            rt.run("create", "--bundle", str(bundle), "life", check=True, stdin=subprocess.DEVNULL)
            created = rt.state("life")
            assert Path(f"/proc/{created['pid']}").exists()
            assert cgroup_dirs(cgroup_path(bundle)), f"{rt.name} made no cgroup for the container"
            assert os.readlink(f"/proc/{created['pid']}/ns/pid") != os.readlink("/proc/self/ns/pid")
            states.append(spec_fields(created))
            rt.run("start", "life", check=True)
            running = rt.state("life")
            assert running["pid"] == created["pid"]
            assert Path(f"/proc/{running['pid']}/cmdline").read_bytes() == b"sleep\x001000\x00"
            states.append(spec_fields(running))
            rt.run("kill", "life", "KILL", check=True)
            states.append(spec_fields(wait_stopped(rt, "life")))
            rt.run("delete", "life", check=True)
            gone = rt.run("state", "life")
            states.append({"state after delete": gone.returncode, "lines": len(error_line(gone))})
        assert_clean(rt, bundle)
        return states

    expected, actual = both(runc, runtime, observe)
    assert actual == expected
    assert [s.get("status") for s in expected[:3]] == ["created", "running", "stopped"]
    assert expected[0] == {"id": "life", "status": "created", "pid": "positive", "bundle": str(bundle),
                           "annotations": {"org.example.test": "lifecycle"}}


BadBundle = Callable[[Path], tuple[list[str], Path | None]]


def _bad_config(change: Callable[[dict[str, Any]], None]) -> BadBundle:
    def build(tmp: Path) -> tuple[list[str], Path | None]:
        bundle = make_bundle(tmp, ["true"])
        config = load_config(bundle)
        change(config)
        write_config(bundle, config)
        return ["--bundle", str(bundle), "bad"], bundle
    return build


def _not_json(tmp: Path) -> tuple[list[str], Path | None]:
    bundle = make_bundle(tmp, ["true"])
    (bundle / "config.json").write_text('{"ociVersion": "1.0.2", "process": ')
    return ["--bundle", str(bundle), "bad"], bundle


def _bad_id(cid: str) -> BadBundle:
    def build(tmp: Path) -> tuple[list[str], Path | None]:
        bundle = make_bundle(tmp, ["true"])
        return ["--bundle", str(bundle), cid], bundle
    return build


BAD_INPUT: dict[str, BadBundle] = {
    "id with a slash": _bad_id("a/b"),
    "id dot-dot": _bad_id(".."),
    "missing bundle": lambda tmp: (["--bundle", str(tmp / "no-such-bundle"), "bad"], None),
    "invalid config.json": _not_json,
    "config field of the wrong type": _bad_config(lambda c: c["process"].update(args="true")),
    "nonexistent rootfs": _bad_config(lambda c: c["root"].update(path="/nonexistent/micropod-rootfs")),
    "unknown namespace type": _bad_config(lambda c: c["linux"]["namespaces"].append({"type": "bogus"})),
    "unknown seccomp syscall": _bad_config(lambda c: c["linux"].update(seccomp={
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["micropod_no_such_syscall"], "action": "SCMP_ACT_ERRNO"}]})),
    "unknown seccomp action": _bad_config(lambda c: c["linux"].update(seccomp={"defaultAction": "SCMP_ACT_NOPE"})),
    "unknown capability": _bad_config(lambda c: c["process"]["capabilities"].update(bounding=["CAP_NOPE"])),
    "unknown rlimit": _bad_config(lambda c: c["process"].update(rlimits=[{"type": "RLIMIT_NOPE", "hard": 1,
                                                                           "soft": 1}])),
    "duplicate namespace": _bad_config(lambda c: c["linux"]["namespaces"].append({"type": "mount"})),
    "hostname without a UTS namespace": _bad_config(lambda c: c["linux"].update(namespaces=[{"type": "mount"}])),
    "relative cwd": _bad_config(lambda c: c["process"].update(cwd="tmp")),
    "empty args": _bad_config(lambda c: c["process"].update(args=[])),
    "no process": _bad_config(lambda c: c.pop("process")),
    "terminal without a console socket": _bad_config(lambda c: c["process"].update(terminal=True)),
}


@pytest.mark.parametrize("command", ["create", "run"])
@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input(runc: Runtime, runtime: Runtime, tmp_path: Path, case: str, command: str) -> None:
    def observe(rt: Runtime) -> tuple[int, int]:
        args, bundle = BAD_INPUT[case](tmp_path / rt.name)
        cid = args[-1]
        with removed(rt, cid):
            # A new session: with no controlling terminal, `run` of a terminal:true process fails the same
            # way wherever the tests are started from.
            done = rt.run(command, *args, stdin=subprocess.DEVNULL, start_new_session=True)
            # One line: runc's error, or its warning when it goes on (an unknown capability).
            assert len(error_line(done)) <= 1, f"{rt.name} {command}: {done.stderr!r}"
        assert_clean(rt, bundle)
        return done.returncode, len(error_line(done))

    expected, actual = both(runc, runtime, observe)
    assert actual == expected


@pytest.mark.parametrize("command", [["state"], ["start"], ["kill", "KILL"], ["delete"], ["pause"], ["ps"],
                                     ["exec", "true"]], ids=lambda c: c[0])
def test_unknown_id(runc: Runtime, runtime: Runtime, command: list[str]) -> None:
    def observe(rt: Runtime) -> tuple[int, int]:
        done = rt.run(command[0], "no-such-container", *command[1:])
        assert_clean(rt, None)
        return done.returncode, len(error_line(done))

    expected, actual = both(runc, runtime, observe)
    assert actual == expected
    assert expected[0] != 0


def test_forced_delete_of_an_unknown_id_succeeds(runc: Runtime, runtime: Runtime) -> None:
    expected, actual = both(runc, runtime, lambda rt: rt.run("delete", "-f", "no-such-container").returncode)
    assert actual == expected == 0


def test_conflicts_keep_the_existing_container(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    """A duplicate create, start of a running container, and delete of a running one without -f all
    fail, and leave the existing container as it was."""
    bundle = make_bundle(tmp_path, ["sleep", "1000"])

    def observe(rt: Runtime) -> list[tuple[str, int, int]]:
        seen = []
        with removed(rt, "busy"):
            rt.run("create", "--bundle", str(bundle), "busy", check=True, stdin=subprocess.DEVNULL)
            before = rt.state("busy")
            for attempt in (["create", "--bundle", str(bundle), "busy"], ["start", "busy"], ["start", "busy"],
                            ["delete", "busy"]):
                done = rt.run(*attempt, stdin=subprocess.DEVNULL)
                now = rt.state("busy")
                assert now["pid"] == before["pid"] and Path(f"/proc/{now['pid']}").exists()
                seen.append((now["status"], done.returncode, len(error_line(done))))
        assert_clean(rt, bundle)
        return seen

    expected, actual = both(runc, runtime, observe)
    assert actual == expected
    # The create conflicts; the first start is the real one and succeeds.
    assert [(s, rc != 0) for s, rc, _ in expected] == [("created", True), ("running", False),
                                                        ("running", True), ("running", True)]


PROBE = """
echo '== status'; grep -E '^(Cap|Seccomp|NoNewPrivs)' /proc/self/status
echo '== ns'; for n in cgroup ipc mnt net pid time user uts; do echo "$n $(readlink /proc/self/ns/$n)"; done
echo '== mountinfo'; cat /proc/self/mountinfo
echo '== cgroup'; cat /proc/self/cgroup
echo '== nofile'; ulimit -n
echo '== id'; id
echo '== hostname'; hostname
echo '== mkdir'; mkdir /tmp/probe-dir 2>&1; echo "status $?"
"""
_SOME_CAPS = ["CAP_CHOWN", "CAP_KILL", "CAP_SETUID", "CAP_SETGID"]
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "user, caps, rlimit, seccomp": {
        "hostname": "probe-host",
        "process": {"user": {"uid": 1000, "gid": 1000, "additionalGids": [10]}, "noNewPrivileges": False,
                    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 512, "soft": 256}],
                    "capabilities": {"bounding": _SOME_CAPS, "effective": _SOME_CAPS[:2],
                                     "permitted": _SOME_CAPS[:2], "inheritable": _SOME_CAPS[:2],
                                     "ambient": _SOME_CAPS[:2]}},
        "mounts": [*DEFAULT_SPEC["mounts"],
                   {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]}],
        "linux": {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir", "mkdirat", "micropod_no_such_syscall"], "action": "SCMP_ACT_ERRNO"}]}},
    },
    "cgroup namespace": {"linux": {"namespaces": [{"type": t} for t in
                                                  ("pid", "network", "ipc", "uts", "mount", "cgroup")]}},
    "host pid, net and uts": {"hostname": None, "linux": {"namespaces": [{"type": "mount"}, {"type": "ipc"}]}},
}


def sections(output: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for line in output.splitlines():
        if line.startswith("== "):
            current = found.setdefault(line[3:], [])
        else:
            current.append(line)
    return found


def container_view(output: str) -> dict[str, Any]:
    seen = sections(output)
    host = {n: os.readlink(f"/proc/self/ns/{n}") for n in NAMESPACE_LINKS.values()}
    own = dict(line.split(" ", 1) for line in seen.pop("ns"))
    seen["private namespaces"] = sorted(n for n, link in own.items() if link != host[n])
    seen["mountpoints"] = sorted(line.split()[4] for line in seen.pop("mountinfo"))
    return seen


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_what_the_container_sees(runc: Runtime, runtime: Runtime, tmp_path: Path, variant: str) -> None:
    bundle = make_bundle(tmp_path, ["sh", "-c", PROBE], **VARIANTS[variant])
    config = load_config(bundle)

    def observe(rt: Runtime) -> dict[str, Any]:
        with removed(rt, "probe"):
            done = rt.run("run", "--bundle", str(bundle), "probe", stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"{rt.name}: {done.stderr}"
        assert_clean(rt, bundle)
        return container_view(done.stdout)

    expected, actual = both(runc, runtime, observe)
    for key in expected:
        assert actual[key] == expected[key], f"{key}: {runtime.name} differs from runc"
    assert actual.keys() == expected.keys()
    asked = sorted(NAMESPACE_LINKS[ns["type"]] for ns in config["linux"]["namespaces"])
    assert expected["private namespaces"] == asked
    status = dict(line.split(":\t") for line in expected["status"])
    assert status["CapBnd"] == cap_mask(config["process"]["capabilities"]["bounding"])
    assert status["NoNewPrivs"] == str(int(config["process"]["noNewPrivileges"]))
    assert status["Seccomp"] == ("2" if "seccomp" in config["linux"] else "0")
    assert expected["nofile"] == [str(config["process"]["rlimits"][0]["soft"])]
    assert expected["id"][0].startswith(f"uid={config['process']['user']['uid']}(")
    assert expected["hostname"] == [config.get("hostname", os.uname().nodename)]
    if "cgroup" in asked:
        assert all(line.endswith(":/") for line in expected["cgroup"])
    else:
        assert all(line.endswith("/" + config["linux"]["cgroupsPath"]) for line in expected["cgroup"])
    if "seccomp" in config["linux"]:
        assert "Operation not permitted" in expected["mkdir"][0]


TRAPS = ('trap "echo got TERM" TERM; trap "echo got USR1" USR1; echo ready; '
         'while :; do sleep 1000 & wait $!; done')


def test_kill_with_signal_names_and_numbers(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sh", "-c", TRAPS])

    def observe(rt: Runtime) -> list[Any]:
        seen: list[Any] = []
        with started(rt, bundle, "sig") as container:
            assert read_line(container.stdout) == "ready\n"
            for signal in ("TERM", "SIGUSR1", "15", "10"):
                rt.run("kill", "sig", signal, check=True)
                seen.append(read_line(container.stdout).strip())
            bad = rt.run("kill", "sig", "NOSUCHSIGNAL")
            seen.append((bad.returncode, len(error_line(bad))))
            rt.run("kill", "sig", "9", check=True)
            seen.append(wait_stopped(rt, "sig")["status"])
        assert_clean(rt, bundle)
        return seen

    expected, actual = both(runc, runtime, observe)
    assert actual == expected
    assert expected[:4] == ["got TERM", "got USR1", "got TERM", "got USR1"]


def test_ps_pause_resume_and_exec(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sh", "-c", "sleep 1000 & echo ready; wait"])

    def observe(rt: Runtime) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with started(rt, bundle, "ops") as container:
            assert read_line(container.stdout) == "ready\n"
            init = rt.state("ops")["pid"]
            pids = json.loads(rt.run("ps", "--format", "json", "ops", check=True).stdout)
            assert init in pids
            seen["ps json"] = len(pids)
            seen["ps header"] = rt.run("ps", "ops", check=True).stdout.splitlines()[0].split()
            done = rt.run("exec", "ops", "sh", "-c", "echo from exec; exit 4")
            seen["exec"] = (done.returncode, done.stdout)
            names = ("ipc", "mnt", "net", "pid", "uts")
            loop = f"for n in {' '.join(names)}; do readlink /proc/self/ns/$n; done"
            inside = rt.run("exec", "ops", "sh", "-c", loop, check=True).stdout.split()
            assert inside == [os.readlink(f"/proc/{init}/ns/{n}") for n in names]
            status = rt.run("exec", "ops", "grep", "-E", "^(Cap|NoNewPrivs|Seccomp)", "/proc/self/status")
            seen["exec status"] = status.stdout
            missing = rt.run("exec", "ops", "/no/such/binary")
            seen["exec missing binary"] = (missing.returncode, len(error_line(missing)))
            rt.run("pause", "ops", check=True)
            seen["paused"] = rt.state("ops")["status"]
            seen["freezer"] = freezer_state(bundle)
            refused = rt.run("exec", "ops", "true")
            seen["exec while paused"] = (refused.returncode, len(error_line(refused)))
            again = rt.run("pause", "ops")
            seen["pause twice"] = again.returncode
            rt.run("resume", "ops", check=True)
            seen["resumed"] = rt.state("ops")["status"]
            seen["freezer after"] = freezer_state(bundle)
            seen["resume twice"] = rt.run("resume", "ops").returncode
        assert_clean(rt, bundle)
        return seen

    expected, actual = both(runc, runtime, observe)
    assert actual == expected
    assert expected["ps json"] == 2 and expected["exec"] == (4, "from exec\n")
    assert (expected["paused"], expected["freezer"]) == ("paused", "FROZEN")
    assert (expected["resumed"], expected["freezer after"]) == ("running", "THAWED")


def test_console_socket(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    script = "tty; [ -t 0 ] && [ -t 1 ] && echo stdio-is-a-tty; echo done"
    bundle = make_bundle(tmp_path, ["sh", "-c", script], process={"terminal": True})

    def observe(rt: Runtime) -> bytes:
        path = Path(f"/tmp/mp-console-{secrets.token_hex(4)}.sock")  # short: sun_path has 108 bytes
        with removed(rt, "tty"), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(path))
            listener.listen(1)
            try:
                create = rt.popen("create", "--bundle", str(bundle), "--console-socket", str(path), "tty",
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                master = receive_fd(listener)
                _, err = create.communicate(timeout=60)
                assert create.returncode == 0, f"{rt.name} create: {err}"
                rt.run("start", "tty", check=True)
                output = read_until_hangup(master)
                os.close(master)
                wait_stopped(rt, "tty")
            finally:
                path.unlink(missing_ok=True)
        return output

    expected, actual = both(runc, runtime, observe)
    assert actual == expected
    assert expected == b"/dev/pts/0\r\nstdio-is-a-tty\r\ndone\r\n"


@pytest.mark.parametrize("how", ["run", "create", "exec"])
def test_no_runtime_fd_leaks_into_the_container(runc: Runtime, runtime: Runtime, tmp_path: Path,
                                                how: str) -> None:
    """The runtime is handed an extra open file; the container must see only its stdio and the fd
    `ls` opens itself."""
    listing = ["ls", "-l", "/proc/self/fd"]
    bundle = make_bundle(tmp_path, listing if how != "exec" else ["sh", "-c", "echo ready; sleep 1000"])
    secret = tmp_path / "runtime-private-file"
    secret.write_text("not for the container")

    def observe(rt: Runtime) -> list[str]:
        with secret.open() as extra, removed(rt, "fds"):
            fd_kwargs: dict[str, Any] = {"pass_fds": (extra.fileno(),), "stdin": subprocess.DEVNULL}
            if how == "run":
                done = rt.run("run", "--bundle", str(bundle), "fds", **fd_kwargs)
                output = done.stdout
            elif how == "create":
                with started(rt, bundle, "fds", pass_fds=(extra.fileno(),)) as container:
                    assert container.stdout is not None
                    output = container.stdout.read()
            else:
                with started(rt, bundle, "fds") as container:
                    assert read_line(container.stdout) == "ready\n"
                    output = rt.run("exec", "fds", *listing, check=True, **fd_kwargs).stdout
        assert str(secret) not in output, f"{rt.name} leaked {secret} into the container:\n{output}"
        assert_clean(rt, bundle)
        return sorted(line.split(" -> ")[0].split()[-1] for line in output.splitlines() if line.startswith("l"))

    expected, actual = both(runc, runtime, observe)
    assert actual == expected
    # 3 is ls's own /proc/self/fd, closed by the time ls reads the links, so it shows with no target.
    assert expected == ["0", "1", "2", "3"]


def test_default_spec_is_runcs(runc: Runtime, tmp_path: Path) -> None:
    subprocess.run(["runc", "spec"], cwd=tmp_path, check=True)
    spec = json.loads((tmp_path / "config.json").read_text())
    spec["process"]["terminal"] = False
    assert spec == DEFAULT_SPEC
