"""Runtime-spec features beyond the basics of test_runtime_diff.py: hooks, user/net/time namespaces, the root
and its mounts, process settings, devices, sysctls, and the commands around a container (update, events, kill
--all, list, features, spec).

As there, runc runs first and the runtime under test second, on the same bundle; where runc 1.1.5 behaves
otherwise on purpose or lacks a feature (the time namespace, domainname), the test says so and asserts each
runtime's behaviour directly. A known micropod-runtime bug is a strict xfail on the "micropod" parameter only
(``known_bug``), so that the fix turns it into a failure to remove the mark.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.runtime_bundle import (  # noqa: F401  (fixtures)
    DEFAULT_SPEC,
    Runtime,
    both,
    cgroup_dirs,
    cgroup_path,
    cgroup_subtree_fixture,
    make_bundle,
    removed,
    runc_fixture,
    runtime_fixture,
    started,
    wait_stopped,
)
from tests.test_runtime_diff import assert_clean, error_line

pytestmark = pytest.mark.runtime
NAMESPACES = DEFAULT_SPEC["linux"]["namespaces"]
WAIT = 30.0  # seconds: a bound on waiting for something to happen, never a pass/fail threshold


def known_bug(request: pytest.FixtureRequest, runtime: Runtime, reason: str) -> None:
    if runtime.name == "micropod":
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))


def run_probe(rt: Runtime, bundle: Path, *flags: str, cid: str = "feat") -> subprocess.CompletedProcess[str]:
    with removed(rt, cid):
        done = rt.run("run", *flags, "--bundle", str(bundle), cid, stdin=subprocess.DEVNULL)
    assert_clean(rt, bundle)
    return done


def with_mounts(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [*DEFAULT_SPEC["mounts"], *extra]


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.01)


# --- hooks ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def hook_log(tmp: Path) -> Iterator[tuple[Path, Path]]:
    """A log directory (bound into the container at /hooklog, for startContainer hooks, which run inside) and
    a host hook script that appends ``<its first argument> <the state from stdin>`` to hooks.log there."""
    logs = tmp / "hooklog"
    logs.mkdir()
    log = logs / "hooks.log"
    log.touch()
    script = tmp / "hook.sh"
    script.write_text(f'#!/bin/sh\necho "$1 $(cat)" >> {log}\n')
    script.chmod(0o755)
    yield log, script


def host_hook(script: Path, kind: str, **extra: Any) -> dict[str, Any]:
    return {"path": str(script), "args": ["hook", kind], **extra}


IN_CONTAINER_HOOK = {"path": "/bin/sh", "args": ["sh", "-c", 'echo "startContainer $(cat)" >> /hooklog/hooks.log']}
ANNOTATIONS = {"org.example.hooks": "yes"}


def logged(log: Path) -> list[tuple[str, dict[str, Any]]]:
    lines = log.read_text().splitlines()
    return [(kind, json.loads(state)) for kind, state in (line.split(" ", 1) for line in lines)]


def test_hooks_get_the_state_in_lifecycle_order(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    with hook_log(tmp_path) as (log, script):
        hooks = {kind: [host_hook(script, kind)]
                 for kind in ("prestart", "createRuntime", "createContainer", "poststart", "poststop")}
        hooks["startContainer"] = [IN_CONTAINER_HOOK]
        bundle = make_bundle(tmp_path, ["sleep", "1000"], hooks=hooks, annotations=ANNOTATIONS, mounts=with_mounts(
            {"destination": "/hooklog", "type": "bind", "source": str(log.parent), "options": ["rbind"]}))

        def observe(rt: Runtime) -> dict[str, list[tuple[str, str, str | None]]]:
            log.write_text("")
            phases: dict[str, list[tuple[str, str, str | None]]] = {}
            seen = 0

            def phase(name: str, count: int) -> None:
                nonlocal seen
                wait_for(lambda: len(logged(log)) >= seen + count, f"{rt.name}: {count} hooks after {name}")
                entries = logged(log)[seen:]
                seen += len(entries)
                for _, state in entries:
                    assert (state["id"], state["bundle"]) == ("hooked", str(bundle)), state
                    assert state.get("annotations") == ANNOTATIONS, state
                pids = {init: "init", 1: "1", 0: None, None: None}
                phases[name] = [(kind, state["status"], pids[state.get("pid")]) for kind, state in entries]

            with removed(rt, "hooked"):
                rt.run("create", "--bundle", str(bundle), "hooked", check=True, stdin=subprocess.DEVNULL)
                init = rt.state("hooked")["pid"]
                phase("create", 4 if rt is runc else 3)
                rt.run("start", "hooked", check=True)
                phase("start", 1 if rt is runc else 2)
                rt.run("kill", "hooked", "KILL", check=True)
                wait_stopped(rt, "hooked")
                rt.run("delete", "hooked", check=True)
                phase("delete", 1)
            assert_clean(rt, bundle)
            phases["start"].sort()  # their order is known_bug's business: test_poststart_runs_after_the_program
            return phases

        expected, actual = both(runc, runtime, observe)
    creating = [("prestart", "creating", "init"), ("createRuntime", "creating", "init"),
                ("createContainer", "creating", "1")]
    # runc 1.1.5 runs poststart hooks during create (opencontainers/runc#1710, moved to start only in #5186).
    assert expected == {"create": [*creating, ("poststart", "created", "init")],
                        "start": [("startContainer", "created", "1")], "delete": [("poststop", "stopped", None)]}
    if runtime is not runc:
        assert actual == {"create": creating,
                          "start": [("poststart", "running", "init"), ("startContainer", "created", "1")],
                          "delete": [("poststop", "stopped", None)]}


def test_poststart_runs_after_the_program_is_executed(tmp_path: Path, cgroup_subtree: str) -> None:
    """runtime.md: startContainer hooks, then the program, then poststart. The startContainer hook waits (up
    to 10 s) for a token that the poststart hook writes: it must never see one. runc 1.1.5 is left out: it
    runs poststart at create (see above)."""
    from tests.runtime_bundle import runtime_named

    rt = runtime_named("micropod", tmp_path)
    with hook_log(tmp_path) as (log, script):
        token = log.parent / "poststart.fifo"
        os.mkfifo(token)
        keep = os.open(token, os.O_RDWR | os.O_NONBLOCK)  # holds what poststart writes until it is read
        script.write_text(f'#!/bin/sh\necho token 1<> {token}\necho "$1 $(cat)" >> {log}\n')
        waits = 'read -t 10 token <> /hooklog/poststart.fifo; echo "startContainer ${token:-alone} $(cat)" >> ' \
                '/hooklog/hooks.log'
        hooks = {"poststart": [host_hook(script, "poststart")],
                 "startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", waits]}]}
        bundle = make_bundle(tmp_path, ["sleep", "1000"], hooks=hooks, mounts=with_mounts(
            {"destination": "/hooklog", "type": "bind", "source": str(log.parent), "options": ["rbind"]}))
        try:
            with removed(rt, "order"):
                rt.run("create", "--bundle", str(bundle), "order", check=True, stdin=subprocess.DEVNULL)
                rt.run("start", "order", check=True)
                wait_for(lambda: len(log.read_text().splitlines()) == 2, "both hooks")
                kinds = [line.split()[:2] for line in log.read_text().splitlines()]
        finally:
            os.close(keep)
    assert kinds[0] == ["startContainer", "alone"], kinds


def test_hook_states_carry_the_runtimes_spec_version(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    with hook_log(tmp_path) as (log, script):
        hooks = {kind: [host_hook(script, kind)] for kind in ("prestart", "createRuntime", "createContainer")}
        bundle = make_bundle(tmp_path, ["true"], ociVersion="1.0.0", hooks=hooks)
        with removed(runtime, "versions"):
            runtime.run("create", "--bundle", str(bundle), "versions", check=True, stdin=subprocess.DEVNULL)
            version = runtime.state("versions")["ociVersion"]
        assert {state["ociVersion"] for _, state in logged(log)} == {version}


@pytest.mark.parametrize("kind", ["prestart", "createRuntime", "createContainer"])
def test_a_hook_past_its_timeout_fails_create(runc: Runtime, runtime: Runtime, tmp_path: Path, kind: str) -> None:
    bundle = make_bundle(tmp_path, ["true"], hooks={kind: [{"path": "/bin/sleep", "args": ["sleep", "60"],
                                                            "timeout": 1}]})

    def observe(rt: Runtime) -> tuple[int, int]:
        with removed(rt, "slow"):
            done = rt.run("create", "--bundle", str(bundle), "slow", stdin=subprocess.DEVNULL)
        assert_clean(rt, bundle)
        return done.returncode, len(error_line(done))

    expected, actual = both(runc, runtime, observe)
    assert actual == expected == (1, 1)


@pytest.mark.parametrize("kind", ["prestart", "createRuntime", "createContainer"])
def test_a_failing_create_hook_fails_create(runc: Runtime, runtime: Runtime, tmp_path: Path, kind: str) -> None:
    bundle = make_bundle(tmp_path, ["true"], hooks={kind: [{"path": "/bin/sh", "args": ["sh", "-c", "exit 3"]}]})

    def observe(rt: Runtime) -> tuple[int, int, int]:
        with removed(rt, "refused"):
            done = rt.run("create", "--bundle", str(bundle), "refused", stdin=subprocess.DEVNULL)
            state = rt.run("state", "refused")
        assert_clean(rt, bundle)
        return done.returncode, len(error_line(done)), state.returncode

    expected, actual = both(runc, runtime, observe)
    assert actual == expected == (1, 1, 1)


@pytest.mark.parametrize("kind", ["startContainer", "poststart"])
def test_a_failing_start_hook_stops_the_container(runc: Runtime, runtime: Runtime, tmp_path: Path,
                                                  kind: str) -> None:
    bundle = make_bundle(tmp_path, ["sleep", "1000"], hooks={kind: [{"path": "/bin/false"}]})  # inside too

    def observe(rt: Runtime) -> tuple[int, int | None, str | None]:
        with removed(rt, "stops"):
            create = rt.run("create", "--bundle", str(bundle), "stops", stdin=subprocess.DEVNULL)
            if create.returncode != 0:
                return create.returncode, None, None
            start = rt.run("start", "stops")
            status = wait_stopped(rt, "stops")["status"]
        assert_clean(rt, bundle)
        return create.returncode, start.returncode, status

    expected, actual = both(runc, runtime, observe)
    if kind == "startContainer":  # runc's start returns before the hook runs; both then stop the container
        assert actual == expected == (0, 0, "stopped")
    else:  # runc 1.1.5 fails create, as it runs poststart there; we fail start, as runtime-spec 1.2 says
        assert expected == (1, None, None)
        assert actual == (0, 1, "stopped") or runtime is runc


def test_a_failing_poststop_hook_only_warns(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    with hook_log(tmp_path) as (log, script):
        hooks = {"poststop": [{"path": "/bin/sh", "args": ["sh", "-c", "exit 4"]}, host_hook(script, "second")]}
        bundle = make_bundle(tmp_path, ["true"], hooks=hooks)

        def observe(rt: Runtime) -> tuple[int, int, int]:
            log.write_text("")
            rt.run("create", "--bundle", str(bundle), "warns", check=True, stdin=subprocess.DEVNULL)
            done = rt.run("delete", "-f", "warns")
            assert_clean(rt, bundle)
            return done.returncode, len(error_line(done)), len(logged(log))

        expected, actual = both(runc, runtime, observe)
    assert actual[:2] == expected[:2] == (0, 1)
    # runtime-spec: the remaining hooks run; runc 1.1.5 stops at the first failure.
    assert (expected[2], actual[2]) == (0, 0 if runtime is runc else 1)


# --- namespaces ----------------------------------------------------------------------------------------

USERNS_PROBE = "id; cat /proc/self/uid_map /proc/self/gid_map; readlink /proc/self/ns/user; touch /tmp/made-inside"
HOST_ID = 100000  # the container's root and 65535 more, none of them a user of this host


def test_user_namespace_maps_root_to_an_unprivileged_range(runc: Runtime, runtime: Runtime) -> None:
    top = Path(tempfile.mkdtemp(prefix="micropod-userns-"))  # pytest's tmp_path is out of reach of HOST_ID
    try:
        top.chmod(0o755)
        mapping = [{"containerID": 0, "hostID": HOST_ID, "size": 65536}]
        bundle = make_bundle(top, ["sh", "-c", USERNS_PROBE], root={"readonly": False}, linux={
            "namespaces": [*NAMESPACES, {"type": "user"}], "uidMappings": mapping, "gidMappings": mapping})
        for path in [bundle / "rootfs", *(bundle / "rootfs").rglob("*")]:
            os.lchown(path, HOST_ID, HOST_ID)
        host_userns = os.readlink("/proc/self/ns/user")

        def observe(rt: Runtime) -> tuple[int, list[str], tuple[int, int] | str]:
            done = run_probe(rt, bundle)
            made = bundle / "rootfs" / "tmp" / "made-inside"
            owner = (made.stat().st_uid, made.stat().st_gid) if made.exists() else f"nothing made: {done.stderr}"
            made.unlink(missing_ok=True)
            # A new namespace's inode number is whatever the kernel has free at the time: only whether it is the
            # host's or a new one can be compared between the two runtimes.
            text = re.sub(r"user:\[\d+\]", "a new user namespace", done.stdout.replace(host_userns, "the host's"))
            lines = [line.split() for line in text.splitlines()]
            return done.returncode, [" ".join(line) for line in lines], owner

        expected, actual = both(runc, runtime, observe)
    finally:
        shutil.rmtree(top)
    assert actual == expected
    assert expected == (0, ["uid=0(root) gid=0(root)", f"0 {HOST_ID} 65536", f"0 {HOST_ID} 65536",
                            "a new user namespace"], (HOST_ID, HOST_ID))


@pytest.fixture(name="netns")
def netns_fixture() -> Iterator[Path]:
    name = f"micropod-test-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        yield Path("/run/netns") / name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True, timeout=30)


def joined_netns(netns: Path) -> list[dict[str, str]]:
    return [{"type": "network", "path": str(netns)} if ns["type"] == "network" else ns for ns in NAMESPACES]


def test_joining_a_network_namespace_by_path(runc: Runtime, runtime: Runtime, tmp_path: Path, netns: Path) -> None:
    bundle = make_bundle(tmp_path, ["readlink", "/proc/self/ns/net"], linux={"namespaces": joined_netns(netns)})
    expected, actual = both(runc, runtime, lambda rt: run_probe(rt, bundle).stdout)
    assert actual == expected == f"net:[{netns.stat().st_ino}]\n"


def test_sysfs_in_a_joined_network_namespace_shows_its_devices(runc: Runtime, runtime: Runtime, tmp_path: Path,
                                                               netns: Path) -> None:
    bundle = make_bundle(tmp_path, ["ls", "/sys/class/net"], linux={"namespaces": joined_netns(netns)})
    expected, actual = both(runc, runtime, lambda rt: run_probe(rt, bundle).stdout)
    assert actual == expected == "lo\n"  # a new netns has nothing but its loopback


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def test_time_namespace_offsets(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    offsets = {"boottime": {"secs": 86400}, "monotonic": {"secs": 3600, "nanosecs": 500}}
    bundle = make_bundle(tmp_path, ["sh", "-c", "cat /proc/self/timens_offsets /proc/uptime"],
                         linux={"namespaces": [*NAMESPACES, {"type": "time"}], "timeOffsets": offsets})
    before = uptime()
    done = run_probe(runtime, bundle)
    after = uptime()
    if runtime is runc:  # runc 1.1 knows no time namespace: one line, nothing left behind
        assert (done.returncode, len(error_line(done))) == (1, 1)
        return
    assert done.returncode == 0, done.stderr
    *clocks, inside = done.stdout.splitlines()
    assert sorted(line.split() for line in clocks) == [["boottime", "86400", "0"], ["monotonic", "3600", "500"]]
    assert before + 86400 - 0.01 <= float(inside.split()[0]) <= after + 86400  # /proc/uptime has centiseconds


# --- the process, devices and sysctls -------------------------------------------------------------------

PROCESS_PROBE = ("cat /proc/self/oom_score_adj; umask; touch /scratch/f; stat -c %a /scratch/f; id; "
                 "grep Groups /proc/self/status")


def test_oom_score_umask_and_additional_gids(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sh", "-c", PROCESS_PROBE],
                         process={"oomScoreAdj": 123, "user": {"uid": 1000, "gid": 1000, "umask": 0o027,
                                                               "additionalGids": [10, 65534]}},
                         # Not /tmp: runc chmods a tmpfs to the mode of the directory it covers, mode= or not.
                         mounts=with_mounts({"destination": "/scratch", "type": "tmpfs", "source": "tmpfs",
                                             "options": ["mode=1777"]}))
    expected, actual = both(runc, runtime, lambda rt: run_probe(rt, bundle).stdout.splitlines())
    assert actual == expected == ["123", "0027", "640",
                                  "uid=1000(alice) gid=1000(alice) groups=10(wheel),65534(nogroup)",
                                  "Groups:\t10 65534 "]


def test_domainname(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sh", "-c", "hostname; cat /proc/sys/kernel/domainname"],
                         hostname="box", domainname="example.org")
    done = run_probe(runtime, bundle)
    # runc 1.1 accepts and ignores domainname (runc 1.2 sets it).
    assert done.stdout == ("box\n(none)\n" if runtime is runc else "box\nexample.org\n"), done.stderr


DEVICES = [
    {"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3, "fileMode": 0o640, "uid": 1000, "gid": 10},
    {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o666},
    {"path": "/dev/kmsg-denied", "type": "c", "major": 1, "minor": 11, "fileMode": 0o600},
]
DEVICES_PROBE = r"""
for d in mynull fuse kmsg-denied; do stat -c '%n %F %t:%T %a %u:%g' /dev/$d; done
( : < /dev/fuse ) 2>/dev/null; echo "fuse $?"
( : < /dev/kmsg-denied ) 2>&1 | grep -o 'Operation not permitted'
echo $(ls /dev)
"""


def test_linux_devices_default_devices_and_the_device_cgroup(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    rules = [{"allow": False, "access": "rwm"}, {"allow": True, "type": "c", "major": 10, "minor": 229,
                                                 "access": "rwm"}]
    bundle = make_bundle(tmp_path, ["sh", "-c", DEVICES_PROBE], linux={"devices": DEVICES,
                                                                        "resources": {"devices": rules}})

    def observe(rt: Runtime) -> tuple[list[str], list[str]]:
        with started(rt, bundle, "devs") as container:
            assert container.stdout is not None
            allowed = [(d / "devices.list").read_text().split("\n") for d in cgroup_dirs(cgroup_path(bundle))
                       if (d / "devices.list").exists()]
            output = container.stdout.read().splitlines()
        assert_clean(rt, bundle)
        return output, sorted(rule for rules in allowed for rule in rules if rule)

    expected, actual = both(runc, runtime, observe)
    assert actual == expected
    output, allowed = expected
    assert output == ["/dev/mynull character special file 1:3 640 1000:10",
                      "/dev/fuse character special file a:e5 666 0:0",
                      "/dev/kmsg-denied character special file 1:b 600 0:0", "fuse 0", "Operation not permitted",
                      # runc's default devices and /dev links, and the mounts under /dev
                      "fd full fuse kmsg-denied mqueue mynull null ptmx pts random shm stderr stdin stdout tty "
                      "urandom zero"]
    assert "c 10:229 rwm" in allowed and not any(rule.startswith("c 1:11 ") for rule in allowed)


def test_sysctls_in_new_namespaces(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    """Written before readonlyPaths makes /proc/sys read-only, as runc does."""
    sysctls = {"kernel.shmmax": "12345678", "net.ipv4.ip_forward": "1"}
    host = {key: Path("/proc/sys", *key.split(".")).read_text() for key in sysctls}
    bundle = make_bundle(tmp_path, ["cat", "/proc/sys/kernel/shmmax", "/proc/sys/net/ipv4/ip_forward"],
                         linux={"sysctl": sysctls})
    expected, actual = both(runc, runtime, lambda rt: run_probe(rt, bundle).stdout)
    assert {key: Path("/proc/sys", *key.split(".")).read_text() for key in sysctls} == host  # ipc and net ns
    assert actual == expected == "12345678\n1\n"
