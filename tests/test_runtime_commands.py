"""The commands around a running container against runc's: update, events --stats, kill --all, list, features
and spec. Helpers and the known_bug convention are test_runtime_features.py's."""

from __future__ import annotations

import json
import os
import select
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.runtime_bundle import (  # noqa: F401  (fixtures)
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
from tests.test_runtime_features import WAIT

pytestmark = pytest.mark.runtime
MiB = 1 << 20
LIMIT_FILES = {"memory": ("memory.limit_in_bytes", "memory.max"), "pids": ("pids.max",)}


def limits(bundle: Path) -> dict[str, str]:
    """The memory and pids limits in the container's cgroup, from whichever hierarchy has each file."""
    found = {}
    for directory in cgroup_dirs(cgroup_path(bundle)):
        for name, files in LIMIT_FILES.items():
            for file in files:
                if (directory / file).exists():
                    found[name] = (directory / file).read_text().strip()
    return found


def test_update_changes_the_cgroup(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sleep", "1000"],
                         linux={"resources": {"memory": {"limit": 64 * MiB}, "pids": {"limit": 50}}})
    resources = tmp_path / "resources.json"
    resources.write_text(json.dumps({"memory": {"limit": 80 * MiB}, "pids": {"limit": 30}}))

    def observe(rt: Runtime) -> list[Any]:
        with started(rt, bundle, "upd"):
            seen: list[Any] = [limits(bundle)]
            seen.append(rt.run("update", "--memory", "100M", "--pids-limit", "20", "upd").returncode)
            seen.append(limits(bundle))
            seen.append(rt.run("update", "-r", str(resources), "upd").returncode)
            seen.append(limits(bundle))
        assert_clean(rt, bundle)
        return seen

    expected, actual = both(runc, runtime, observe)
    assert actual == expected
    assert expected == [{"memory": str(64 * MiB), "pids": "50"}, 0, {"memory": str(100 * MiB), "pids": "20"}, 0,
                        {"memory": str(80 * MiB), "pids": "30"}]


def shape(value: Any) -> Any:
    """A JSON document with every scalar replaced by its type, and every list by the shape of its first item."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def test_events_stats_shape(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sleep", "1000"], linux={"resources": {"pids": {"limit": 50}}})

    def observe(rt: Runtime) -> tuple[Any, int, int]:
        with started(rt, bundle, "ev"):
            stats = json.loads(rt.run("events", "--stats", "ev", check=True).stdout)
            assert (stats["type"], stats["id"], stats["data"]["pids"]) == ("stats", "ev", {"current": 1, "limit": 50})
            rt.run("kill", "ev", "KILL", check=True)
            wait_stopped(rt, "ev")
            stopped = rt.run("events", "--stats", "ev")
        unknown = rt.run("events", "--stats", "no-such-container")
        assert_clean(rt, bundle)
        return shape(stats), stopped.returncode, unknown.returncode

    expected, actual = both(runc, runtime, observe)
    assert actual == expected
    assert expected[1:] == (1, 1)


def read_until(stream: Any, marker: str) -> str:
    """The container's output up to ``marker``, read from the file descriptor (no buffering to hide lines)."""
    out = ""
    while marker not in out:
        assert select.select([stream.fileno()], [], [], WAIT)[0], f"no {marker!r} from the container: {out!r}"
        chunk = os.read(stream.fileno(), 4096).decode()
        assert chunk, f"the container closed its output before {marker!r}: {out!r}"
        out += chunk
    return out


# init traps USR1 and waits for its child, which USR1 kills.
TRAPS = ('trap "echo init USR1" USR1; sleep 1000 & echo ready; '
         'while kill -0 $! 2>/dev/null; do wait $!; done; echo child gone; exec sleep 1000')


def test_kill_all_signals_every_process(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sh", "-c", TRAPS])

    def observe(rt: Runtime) -> list[Any]:
        seen: list[Any] = []
        with started(rt, bundle, "all") as container:
            assert read_until(container.stdout, "ready\n") == "ready\n"
            pids = json.loads(rt.run("ps", "--format", "json", "all", check=True).stdout)
            rt.run("kill", "all", "USR1", check=True)
            seen.append(read_until(container.stdout, "USR1\n"))
            seen.append([Path(f"/proc/{pid}").exists() for pid in pids])  # the child still runs
            rt.run("kill", "--all", "all", "USR1", check=True)
            seen.append(read_until(container.stdout, "gone\n"))
            seen.append(len(json.loads(rt.run("ps", "--format", "json", "all", check=True).stdout)))
            seen.append(rt.run("kill", "--all", "all", "KILL").returncode)
            seen.append(wait_stopped(rt, "all")["status"])
        assert_clean(rt, bundle)
        return seen

    expected, actual = both(runc, runtime, observe)
    assert actual == expected == ["init USR1\n", [True, True], "init USR1\nchild gone\n", 1, 0, "stopped"]


def test_kill_all_of_a_stopped_container_succeeds(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["true"])

    def observe(rt: Runtime) -> tuple[int, int]:
        with started(rt, bundle, "done"):
            wait_stopped(rt, "done")
            return rt.run("kill", "--all", "done", "KILL").returncode, rt.run("kill", "done", "KILL").returncode

    expected, actual = both(runc, runtime, observe)
    assert actual == expected == (0, 1)


def listed(rt: Runtime, bundle: Path) -> dict[str, Any]:
    rt.run("create", "--bundle", str(bundle), "one", check=True, stdin=subprocess.DEVNULL)
    rt.run("create", "--bundle", str(bundle), "two", check=True, stdin=subprocess.DEVNULL)
    rt.run("start", "two", check=True)
    table = [line.split() for line in rt.run("list", check=True).stdout.splitlines()]
    rows = json.loads(rt.run("list", "--format", "json", check=True).stdout)
    return {"quiet": rt.run("list", "-q", check=True).stdout, "header": table[0], "table": table[1:], "json": rows}


def test_list(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sleep", "1000"])

    def observe(rt: Runtime) -> dict[str, Any]:
        with removed(rt, "one"), removed(rt, "two"):
            seen = listed(rt, bundle)
        assert_clean(rt, bundle)
        seen["table"] = [[cid, int(pid) > 0, status, path] for cid, pid, status, path, *_ in seen["table"]]
        seen["json"] = [(sorted(row), row["id"], row["status"]) for row in seen["json"]]
        return seen

    expected, actual = both(runc, runtime, observe)
    assert actual == expected
    assert expected["quiet"] == "one\ntwo\n"
    assert expected["header"] == ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"]
    assert expected["table"] == [["one", True, "created", str(bundle)], ["two", True, "running", str(bundle)]]


def test_list_shows_the_owner(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sleep", "1000"])

    def observe(rt: Runtime) -> tuple[list[str], list[str]]:
        with removed(rt, "one"), removed(rt, "two"):
            seen = listed(rt, bundle)
        return [row[-1] for row in seen["table"]], [row["owner"] for row in seen["json"]]

    expected, actual = both(runc, runtime, observe)
    assert actual == expected == (["root", "root"], ["root", "root"])


def same_shape(theirs: Any, ours: Any, where: str = "") -> None:
    """Every key of runc's document is in ours, holding the same JSON type."""
    assert type(ours) is type(theirs), f"{where}: {type(ours).__name__}, runc has {type(theirs).__name__}"
    if isinstance(theirs, dict):
        for key, value in theirs.items():
            assert key in ours, f"{where}/{key} missing"
            same_shape(value, ours[key], f"{where}/{key}")
    elif isinstance(theirs, list) and theirs and ours:
        same_shape(theirs[0], ours[0], f"{where}[0]")


def test_features_has_the_runtime_spec_shape(runc: Runtime, runtime: Runtime) -> None:
    theirs = json.loads(runc.run("features", check=True).stdout)
    ours = json.loads(runtime.run("features", check=True).stdout)
    for runtime_specific in ("org.opencontainers.runc.checkpoint.enabled", "org.opencontainers.runc.commit",
                             "org.opencontainers.runc.version"):
        theirs["annotations"].pop(runtime_specific)
    same_shape(theirs, ours)
    assert {"ociVersionMin", "ociVersionMax", "hooks", "mountOptions", "linux"} <= set(ours)


@pytest.mark.parametrize("flags", [[], ["--rootless"]], ids=["plain", "rootless"])
def test_spec_writes_runcs_config(runc: Runtime, runtime: Runtime, tmp_path: Path, flags: list[str]) -> None:
    def observe(rt: Runtime) -> tuple[dict[str, Any], int, int]:
        bundle = tmp_path / f"spec-{rt.name}"
        bundle.mkdir()
        rt.run("spec", *flags, "--bundle", str(bundle), check=True)
        again = rt.run("spec", *flags, "--bundle", str(bundle))  # refuses to overwrite
        config: dict[str, Any] = json.loads((bundle / "config.json").read_text())
        return config, again.returncode, len(error_line(again))

    expected, actual = both(runc, runtime, observe)
    theirs, ours = dict(expected[0]), dict(actual[0])
    # runc 1.1.5 writes the runtime-spec version it was built with; ours is the one we implement.
    assert (theirs.pop("ociVersion"), ours.pop("ociVersion")) == ("1.0.2-dev",
                                                                  "1.0.2-dev" if runtime is runc else "1.2.0")
    assert (ours, *actual[1:]) == (theirs, *expected[1:])
    assert expected[1:] == (1, 1)


def test_create_pid_file_and_preserve_fds(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sh", "-c", "ls /proc/self/fd; cat <&3"])
    shared = tmp_path / "passed-on"
    shared.write_text("through fd 3\n")

    def observe(rt: Runtime) -> tuple[list[str], bool]:
        pid_file = tmp_path / f"{rt.name}.pid"
        # A shell opens the file as the runtime's fd 3, as a caller handing it to the container would.
        opener = Runtime(rt.name, ["sh", "-c", f'exec "$@" 3< "{shared}"', "sh", *rt.binary], rt.root)
        with removed(rt, "fds"):
            create = opener.popen("create", "--pid-file", str(pid_file), "--preserve-fds", "1", "--bundle",
                                  str(bundle), "fds", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
            assert create.wait(WAIT) == 0
            same = int(pid_file.read_text()) == rt.state("fds")["pid"]
            rt.run("start", "fds", check=True)
            assert create.stdout is not None
            output = create.stdout.read().split()
            create.stdout.close()
        assert_clean(rt, bundle)
        return output, same

    expected, actual = both(runc, runtime, observe)
    assert actual == expected == (["0", "1", "2", "3", "4", "through", "fd", "3"], True)  # 4: ls's own


def test_exec_options(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sleep", "1000"])
    process = tmp_path / "process.json"
    process.write_text(json.dumps({"args": ["sh", "-c", "echo from process.json; id -u"], "cwd": "/etc",
                                   "env": ["PATH=/bin"], "user": {"uid": 65534, "gid": 65534}}))

    def observe(rt: Runtime) -> list[Any]:
        pid_file = tmp_path / f"{rt.name}-exec.pid"
        with started(rt, bundle, "ex"):
            flags = rt.run("exec", "--env", "FOO=bar", "--cwd", "/tmp", "--user", "1000:1000", "ex",
                           "sh", "-c", 'echo "$FOO $(pwd) $(id -u):$(id -g)"')
            from_file = rt.run("exec", "--process", str(process), "ex")
            detached = rt.run("exec", "--detach", "--pid-file", str(pid_file), "ex", "sleep", "1000")
            pids = json.loads(rt.run("ps", "--format", "json", "ex", check=True).stdout)
            seen = [flags.stdout, from_file.stdout, detached.returncode, int(pid_file.read_text()) in pids]
        assert_clean(rt, bundle)
        return seen

    expected, actual = both(runc, runtime, observe)
    assert actual == expected == ["bar /tmp 1000:1000\n", "from process.json\n65534\n", 0, True]


def test_run_detach_and_keep(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    long, short = make_bundle(tmp_path, ["sleep", "1000"]), make_bundle(tmp_path, ["true"])

    def observe(rt: Runtime) -> list[Any]:
        with removed(rt, "bg"), removed(rt, "kept"):
            detached = rt.run("run", "--detach", "--bundle", str(long), "bg", stdin=subprocess.DEVNULL)
            kept = rt.run("run", "--keep", "--bundle", str(short), "kept", stdin=subprocess.DEVNULL)
            seen = [detached.returncode, rt.state("bg")["status"], kept.returncode, rt.state("kept")["status"]]
        for bundle in (long, short):
            assert_clean(rt, bundle)
        return seen

    expected, actual = both(runc, runtime, observe)
    assert actual == expected == [0, "running", 0, "stopped"]


def test_log_file_in_json(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    """Where containerd's shim reads a failure: --log FILE --log-format json, one object per line."""
    def observe(rt: Runtime) -> tuple[int, list[tuple[list[str], str]]]:
        log = tmp_path / f"{rt.name}.log"
        done = rt.run("--log", str(log), "--log-format", "json", "create", "--bundle", str(tmp_path / "missing"),
                      "nope")
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        return done.returncode, [(sorted(entry), entry["level"]) for entry in entries]

    expected, actual = both(runc, runtime, observe)
    assert actual == expected == (1, [(["level", "msg", "time"], "error")])
