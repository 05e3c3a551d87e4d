"""micropod.runtime.cgroups: the path rules, validation and v1-to-v2 conversions as pure functions, then
both managers on the real kernel (as root): v1 on this host's hierarchies, v2 on its cgroup2 mount.

Every cgroup made here lives under a ``micropod-test-<random>`` directory, removed in a finally block.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from micropod import syscalls
from micropod.errors import CgroupError, SpecError
from micropod.runtime import cgroups
from micropod.runtime.cgroups_devices import (
    DEFAULT_ALLOWED_DEVICES,
    DevicePolicy,
    DeviceRule,
    container_device_rules,
    device_filter_program,
    parse_device_rules,
)
from micropod.runtime.cgroups_v1 import V1Cgroup
from micropod.runtime.cgroups_v2 import V2Cgroup

ROOT = Path("/sys/fs/cgroup")
UNIFIED = ROOT / "unified"


def _magic(path: Path) -> int:
    try:
        return syscalls.filesystem_magic(str(path))
    except OSError:
        return 0


HAVE_V1 = os.geteuid() == 0 and _magic(ROOT / "devices") == cgroups.CGROUP_SUPER_MAGIC
HAVE_V2 = os.geteuid() == 0 and _magic(UNIFIED) == cgroups.CGROUP2_SUPER_MAGIC
needs_v1 = pytest.mark.skipif(not HAVE_V1, reason="needs root and cgroup v1 hierarchies under /sys/fs/cgroup")
needs_v2 = pytest.mark.skipif(not HAVE_V2, reason="needs root and cgroup2 at /sys/fs/cgroup/unified")

CHILD_WAIT = 30  # seconds: a bound on waiting for a child, never a pass/fail threshold


# --- path rules -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("given", "expected"), [
    (None, "box"), ("", "box"), ("/a/b", "/a/b"), ("a/b", "a/b"), ("//a/./b/", "/a/b"), ("./x", "x"),
])
def test_inner_path_follows_runc(given: str | None, expected: str) -> None:
    assert cgroups.inner_path(given, "box") == expected


@pytest.mark.parametrize("bad", ["/a/../b", "..", "a/\0b", "/", "//.", 7, "/" + "x" * 256])
def test_inner_path_refuses_escapes_and_the_root(bad: object) -> None:
    with pytest.raises(SpecError) as info:
        cgroups.inner_path(bad, "box")
    assert info.value.field == "linux.cgroupsPath"


def test_default_path_needs_an_id_that_names_one_cgroup() -> None:
    with pytest.raises(SpecError):
        cgroups.inner_path(None, "../x")


MOUNTINFO = """\
25 30 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
27 25 0:24 /ctr /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
28 25 0:25 / /sys/fs/cgroup/devices rw - cgroup cgroup rw,devices
29 25 0:26 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
30 25 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
31 40 0:28 / /elsewhere/pids rw - cgroup cgroup rw,pids
"""
OWN = cgroups.own_cgroups("5:devices:/user/1\n4:memory:/ctr/job\n3:cpu,cpuacct:/user/1\n1:name=systemd:/s\n0::/u/me\n")


def test_own_cgroups_reads_every_line() -> None:
    assert OWN == {"devices": "/user/1", "memory": "/ctr/job", "cpu": "/user/1", "cpuacct": "/user/1",
                   "name=systemd": "/s", "": "/u/me"}


def test_v1_absolute_path_is_taken_from_each_hierarchy_root() -> None:
    paths = cgroups.v1_paths(ROOT, "/a/b", MOUNTINFO, None)
    # Mounts elsewhere are left alone; co-mounted ones share a path; name=systemd and a hybrid host's cgroup2
    # hierarchy ("") are joined, as runc joins them.
    assert paths == {"cpu": ROOT / "cpu,cpuacct/a/b", "cpuacct": ROOT / "cpu,cpuacct/a/b",
                     "memory": ROOT / "memory/a/b", "devices": ROOT / "devices/a/b",
                     "name=systemd": ROOT / "systemd/a/b", "": ROOT / "unified/a/b"}


def test_v1_relative_path_is_below_our_own_cgroup() -> None:
    paths = cgroups.v1_paths(ROOT, "box", MOUNTINFO, OWN)
    assert paths["cpu"] == ROOT / "cpu,cpuacct/user/1/box"
    assert paths["memory"] == ROOT / "memory/job/box"  # the mount's own root (/ctr) is not repeated
    assert paths["devices"] == ROOT / "devices/user/1/box"


def test_v1_needs_the_devices_hierarchy() -> None:
    without = "\n".join(line for line in MOUNTINFO.splitlines() if "devices" not in line)
    with pytest.raises(CgroupError, match="devices"):
        cgroups.v1_paths(ROOT, "/a", without, None)


def test_v2_paths() -> None:
    assert cgroups.v2_path(ROOT, "/a/b", None) == ROOT / "a/b"
    # Relative: below the parent of our cgroup, which has processes and so could not delegate.
    assert cgroups.v2_path(ROOT, "box", OWN) == ROOT / "u/box"


def test_cgroup_from_paths_only_takes_cgroups_below_the_root() -> None:
    assert isinstance(cgroups.cgroup_from_paths({"": "/sys/fs/cgroup/x"}), V2Cgroup)
    group = cgroups.cgroup_from_paths({"memory": "/sys/fs/cgroup/memory/x", "devices": "/sys/fs/cgroup/devices/x"})
    assert isinstance(group, V1Cgroup)
    assert group.paths() == {"memory": "/sys/fs/cgroup/memory/x", "devices": "/sys/fs/cgroup/devices/x"}
    for bad in ("/etc", "/sys/fs/cgroup", "/sys/fs/cgroup/x/../../../etc", "sys/fs/cgroup/x"):
        with pytest.raises(CgroupError):
            cgroups.cgroup_from_paths({"": bad})


# --- conversions and validation ---------------------------------------------------------------------------

def test_cpu_shares_to_weight() -> None:
    assert [cgroups.cpu_weight_from_shares(s) for s in (0, 2, 1024, 262144)] == [0, 1, 39, 10000]


def test_blkio_weight_to_io_weight() -> None:
    assert [cgroups.io_weight_from_blkio(w) for w in (0, 10, 500, 1000)] == [0, 1, 4950, 10000]


def test_v2_swap_is_swap_alone() -> None:
    assert cgroups.v2_swap(300, 100) == 200
    assert cgroups.v2_swap(100, 100) == 0  # memory == memory+swap: no swap at all
    assert cgroups.v2_swap(-1, 100) == -1
    assert cgroups.v2_swap(0, 100) == 0
    assert cgroups.v2_swap(0, -1) == -1  # unlimited memory, swap not given: unlimited swap too
    for swap, limit in ((50, 100), (300, 0), (300, -1)):
        with pytest.raises(SpecError, match=r"linux\.resources\.memory\.swap"):
            cgroups.v2_swap(swap, limit)


def test_v2_limit() -> None:
    assert [cgroups.v2_limit(v) for v in (0, -1, 4096)] == [None, "max", "4096"]


@pytest.mark.parametrize(("resources", "field"), [
    ([], "linux.resources"),
    ({"memory": {"limit": "1G"}}, "linux.resources.memory.limit"),
    ({"memory": {"limit": True}}, "linux.resources.memory.limit"),
    ({"memory": {"limit": -2}}, "linux.resources.memory.limit"),
    ({"memory": {"swappiness": 101}}, "linux.resources.memory.swappiness"),
    ({"memory": {"limit": 200, "swap": 100}}, "linux.resources.memory.swap"),
    ({"memory": {"disableOOMKiller": 1}}, "linux.resources.memory.disableOOMKiller"),
    ({"cpu": {"shares": 1}}, "linux.resources.cpu.shares"),
    ({"cpu": {"period": -1}}, "linux.resources.cpu.period"),
    ({"cpu": {"cpus": "0-1,x"}}, "linux.resources.cpu.cpus"),
    ({"cpu": {"idle": 2}}, "linux.resources.cpu.idle"),
    ({"pids": {}}, "linux.resources.pids.limit"),
    ({"blockIO": {"weight": 5}}, "linux.resources.blockIO.weight"),
    ({"blockIO": {"throttleReadBpsDevice": [{"major": 8, "minor": 0}]}},
     "linux.resources.blockIO.throttleReadBpsDevice[0].rate"),
    ({"hugepageLimits": [{"pageSize": "2 MB", "limit": 1}]}, "linux.resources.hugepageLimits[0].pageSize"),
    ({"devices": [{"allow": "yes"}]}, "linux.resources.devices[0].allow"),
    ({"devices": [{"allow": True, "type": "p"}]}, "linux.resources.devices[0].type"),
    ({"devices": [{"allow": True, "type": "c", "access": "rwx"}]}, "linux.resources.devices[0].access"),
    ({"devices": [{"allow": True, "type": "c", "major": -5}]}, "linux.resources.devices[0].major"),
    ({"unified": {"cgroup.procs": "1"}}, "linux.resources.unified.cgroup.procs"),
    ({"unified": {"memory.max": 5}}, "linux.resources.unified.memory.max"),
    ({"unified": {"../etc/passwd": "x"}}, "linux.resources.unified"),
])
def test_validation_names_the_bad_field(resources: object, field: str) -> None:
    with pytest.raises(SpecError) as info:
        cgroups.validate_resources(resources)
    assert info.value.field == field


def test_valid_resources_pass() -> None:
    cgroups.validate_resources({
        "devices": [{"allow": False, "access": "rwm"}, *DEFAULT_ALLOWED_DEVICES],
        "memory": {"limit": 1 << 30, "reservation": 1 << 29, "swap": -1, "kernel": -1, "swappiness": 0,
                   "disableOOMKiller": False},
        "cpu": {"shares": 1024, "quota": -1, "period": 100000, "cpus": "0-1,3", "mems": "0", "idle": 0},
        "pids": {"limit": -1}, "hugepageLimits": [{"pageSize": "2MB", "limit": 0}],
        "blockIO": {"weight": 500, "weightDevice": [{"major": 8, "minor": 0, "weight": 10}]},
        "unified": {"memory.high": "max", "cgroup.max.depth": "3"}, "futureField": {"anything": 1},
    })


def test_version_specific_validation() -> None:
    with pytest.raises(SpecError, match="cgroup v2") as info:
        V1Cgroup({"devices": ROOT / "devices/x"}).validate({"unified": {"memory.high": "1"}})
    assert info.value.field == "linux.resources.unified"
    with pytest.raises(SpecError) as info:
        V2Cgroup(ROOT, ROOT / "x").validate({"cpu": {"realtimeRuntime": 100}})
    assert info.value.field == "linux.resources.cpu.realtimeRuntime"


# --- device rules -------------------------------------------------------------------------------------------

def test_device_rules_fold_into_a_policy() -> None:
    rules = parse_device_rules([{"allow": False, "access": "rwm"}, *DEFAULT_ALLOWED_DEVICES,
                                {"allow": False, "type": "c", "major": 1, "minor": 3, "access": "w"}])
    policy = DevicePolicy.from_rules(rules)
    assert not policy.default_allow
    assert policy.exceptions[("c", 1, 3)] == frozenset("rm")  # the later deny took "w" away
    assert policy.exceptions[("c", -1, -1)] == frozenset("m")
    allow_all = DevicePolicy.from_rules(parse_device_rules([{"allow": True}]))
    assert allow_all == DevicePolicy(default_allow=True)


def test_container_device_rules_add_runcs_defaults() -> None:
    own = [{"allow": False, "access": "rwm"}]
    rules = container_device_rules(own, [{"path": "/dev/null", "type": "c", "major": 1, "minor": 3}])
    assert rules[0] == own[0] and len(rules) == len(DEFAULT_ALLOWED_DEVICES)  # /dev/null's default left out
    assert {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"} not in rules
    assert container_device_rules(None)[0] == DEFAULT_ALLOWED_DEVICES[0]


def test_a_deny_cannot_punch_a_hole_in_a_wildcard_allow() -> None:
    with pytest.raises(SpecError, match="hole") as info:
        cgroups.validate_resources({"devices": [{"allow": False}, {"allow": True, "type": "c", "access": "rw"},
                                                {"allow": False, "type": "c", "major": 1, "minor": 3, "access": "r"}]})
    assert info.value.field == "linux.resources.devices[2]"


def test_device_transition_is_minimal() -> None:
    current = DevicePolicy.from_v1_list("c 1:3 rwm\nc 1:5 rwm\n")
    target = DevicePolicy.from_rules(parse_device_rules([
        {"allow": False}, {"allow": True, "type": "c", "major": 1, "minor": 3},
        {"allow": True, "type": "c", "major": 1, "minor": 9, "access": "r"}]))
    assert current.transition(target) == [DeviceRule(False, "c", 1, 5, "rwm"), DeviceRule(True, "c", 1, 9, "r")]
    # From allow-all (whose deny list cannot be read back) the way is a reset first.
    steps = DevicePolicy.from_v1_list("a *:* rwm\n").transition(target)
    assert steps[0] == DeviceRule(False, "a") and steps[0].cgroup_v1_line() == "a"


def test_device_filter_program_shape() -> None:
    program = device_filter_program(DevicePolicy.from_rules(parse_device_rules(
        [{"allow": False}, {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "r"}])))
    assert len(program) % 8 == 0
    assert program[-8] == 0x95 and program[-16] == 0xB7  # ends "r0 = default; exit"
    # prelude 6, then type + access(3) + major + minor checks, r0 = 1, exit; then the default's 2.
    assert len(program) // 8 == 6 + 6 + 2 + 2


# --- file access ------------------------------------------------------------------------------------------

def test_writes_do_not_follow_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("untouched")
    (tmp_path / "memory.max").symlink_to(target)
    with pytest.raises(CgroupError, match=r"memory\.max"):
        cgroups.write_value(tmp_path, "memory.max", "1")
    assert target.read_text() == "untouched"


def test_write_errors_name_the_file_and_value(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match=r"'42'.*nowhere/pids\.max"):
        cgroups.write_value(tmp_path / "nowhere", "pids.max", "42")


# --- helpers for the real-kernel tests ---------------------------------------------------------------------

def _remove_tree(path: Path) -> None:
    """Best-effort teardown of a test cgroup tree: thaw, kill what is left, rmdir bottom-up."""
    if not path.is_dir():
        return
    for current, _dirs, _files in os.walk(path, topdown=False):
        directory = Path(current)
        for name, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
            if (directory / name).exists():
                (directory / name).write_text(value)
        for pid in (directory / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


@pytest.fixture
def v1_base() -> Iterator[str]:
    name = f"micropod-test-{secrets.token_hex(4)}"
    try:
        yield f"/{name}"
    finally:
        for hierarchy in ROOT.iterdir():
            if not hierarchy.is_symlink():
                _remove_tree(hierarchy / name)


@pytest.fixture
def v2_root() -> Iterator[Path]:
    """A test cgroup on the cgroup2 mount, used as the root: create() enables controllers in it, never in
    the host's own root."""
    root = UNIFIED / f"micropod-test-{secrets.token_hex(4)}"
    root.mkdir()
    try:
        yield root
    finally:
        _remove_tree(root)


def _spawn(code: str) -> subprocess.Popen[str]:
    """A Python child that waits for a line on stdin before running ``code``: time to put it in a cgroup."""
    return subprocess.Popen([sys.executable, "-I", "-c", f"import sys\nsys.stdin.readline()\n{code}"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_in(group: cgroups.Cgroup, code: str) -> tuple[int, str]:
    child = _spawn(code)
    try:
        group.add(child.pid)
        out, _ = child.communicate("go\n", timeout=CHILD_WAIT)
        return child.returncode, out
    finally:
        child.kill()
        child.wait()


def _proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


OPEN_DEVICES = """
import os
for path, mode in (("/dev/null", os.O_RDWR), ("/dev/zero", os.O_RDONLY), ("/dev/zero", os.O_WRONLY)):
    try:
        os.close(os.open(path, mode))
        print("ok", end=" ")
    except PermissionError:
        print("denied", end=" ")
"""
DENY_BUT_NULL = [{"allow": False, "access": "rwm"}, {"allow": True, "type": "c", "major": 1, "minor": 3}]
ALSO_READ_ZERO = [*DENY_BUT_NULL, {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "r"}]


# --- cgroup v1 ------------------------------------------------------------------------------------------------

@needs_v1
def test_v1_lifecycle(v1_base: str) -> None:
    group = cgroups.open_cgroup(f"{v1_base}/c1", "c1")
    assert isinstance(group, V1Cgroup) and not group.exists()
    group.create()
    assert group.exists()
    group.apply({"memory": {"limit": 64 << 20}, "pids": {"limit": 32},
                 "cpu": {"quota": 20000, "period": 100000, "shares": 512}})
    paths = {name: Path(path) for name, path in group.paths().items()}
    assert (paths["memory"] / "memory.limit_in_bytes").read_text() == f"{64 << 20}\n"
    assert (paths["pids"] / "pids.max").read_text() == "32\n"
    assert (paths["cpu"] / "cpu.cfs_quota_us").read_text() == "20000\n"
    assert (paths["cpu"] / "cpu.cfs_period_us").read_text() == "100000\n"
    assert (paths["cpu"] / "cpu.shares").read_text() == "512\n"

    child = subprocess.Popen(["sleep", "600"])
    try:
        group.add(child.pid)
        assert group.pids() == [child.pid]
        assert f"{child.pid}\n" in (paths["cpuset"] / "cgroup.procs").read_text()  # cpus/mems were inherited

        group.freeze()
        assert (paths["freezer"] / "freezer.state").read_text() == "FROZEN\n"
        assert group.state() == "frozen"
        assert _proc_state(child.pid) == "D"  # held in the refrigerator
        group.thaw()
        assert (paths["freezer"] / "freezer.state").read_text() == "THAWED\n"
        assert group.state() == "running"

        stats = group.stats()
        json.dumps(stats)
        assert set(stats) == {"cpu", "cpuset", "memory", "pids", "blkio", "hugetlb", "intel_rdt",
                              "network_interfaces"}
        assert stats["pids"] == {"current": 1, "limit": 32}
        assert stats["memory"]["usage"]["limit"] == 64 << 20
        assert {"kernel", "user"} <= set(stats["cpu"]["usage"])
        assert set(stats["memory"]) >= {"usage", "swap", "kernel", "kernelTCP", "raw"}

        group.kill_all(signal.SIGKILL)
        assert child.wait(timeout=CHILD_WAIT) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    group.destroy()
    assert not group.exists()
    group.destroy()  # again: nothing there is fine


@needs_v1
def test_v1_kill_all_keeps_a_paused_cgroup_paused(v1_base: str) -> None:
    group = cgroups.open_cgroup(f"{v1_base}/c", "c")
    group.create()
    child = subprocess.Popen(["sleep", "600"])
    try:
        group.add(child.pid)
        group.freeze()
        group.kill_all(signal.SIGTERM)
        assert group.state() == "frozen"  # the signal waits for resume
        group.thaw()
        assert child.wait(timeout=CHILD_WAIT) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()


@needs_v1
def test_v1_device_rules_are_enforced(v1_base: str) -> None:
    group = cgroups.open_cgroup(f"{v1_base}/c", "c")
    group.create()
    group.apply({"devices": DENY_BUT_NULL})
    assert (Path(group.paths()["devices"]) / "devices.list").read_text() == "c 1:3 rwm\n"
    assert _run_in(group, OPEN_DEVICES) == (0, "ok denied denied ")
    group.apply({"devices": ALSO_READ_ZERO})  # an update: no reset, just the new exception
    assert _run_in(group, OPEN_DEVICES) == (0, "ok ok denied ")


@needs_v1
def test_v1_pids_limit_stops_a_fork_loop(v1_base: str) -> None:
    group = cgroups.open_cgroup(f"{v1_base}/c", "c")
    group.create()
    group.apply({"pids": {"limit": 5}})
    code, out = _run_in(group, """
import os
r, w = os.pipe()
made = 0
try:
    for _ in range(20):
        if os.fork() == 0:
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        made += 1
    print("allowed", made)
except BlockingIOError:
    print("refused after", made)
os.close(w)
""")
    assert (code, out) == (0, "refused after 4\n")  # 4 children and the parent make 5


@needs_v1
def test_v1_memory_limit_gets_a_process_oom_killed(v1_base: str) -> None:
    group = cgroups.open_cgroup(f"{v1_base}/c", "c")
    group.create()
    group.apply({"memory": {"limit": 32 << 20, "swap": 32 << 20}})
    code, out = _run_in(group, "data = b'x' * (256 << 20)\nprint('survived', len(data))")
    assert code == -signal.SIGKILL and out == ""
    oom = (Path(group.paths()["memory"]) / "memory.oom_control").read_text()
    assert "oom_kill 1" in oom.splitlines() or int((Path(group.paths()["memory"]) / "memory.failcnt").read_text())


@needs_v1
def test_v1_refuses_limits_of_controllers_not_mounted(v1_base: str) -> None:
    group = cgroups.open_cgroup(f"{v1_base}/c", "c")
    if "hugetlb" in group.paths():
        pytest.skip("this host mounts hugetlb as v1")
    group.create()
    with pytest.raises(CgroupError, match="hugetlb"):
        group.apply({"hugepageLimits": [{"pageSize": "2MB", "limit": 0}]})


@needs_v1
@pytest.mark.skipif(shutil.which("runc") is None or shutil.which("busybox") is None, reason="needs runc, busybox")
def test_v1_matches_runc(v1_base: str, tmp_path: Path) -> None:
    """The same resources through runc and through us: the same device list, and ``events --stats`` data
    of the same shape."""
    fuse = {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "rw"}  # runc needs "access"
    devices = [{"allow": False, "access": "rwm"}, fuse]
    resources: dict[str, Any] = {"memory": {"limit": 64 << 20}, "pids": {"limit": 32},
                                 "cpu": {"quota": 20000, "period": 100000}, "devices": devices}
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "", rootfs / "bin/busybox")
    subprocess.run(["runc", "spec"], cwd=tmp_path, check=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["process"].update(args=["/bin/busybox", "sleep", "600"], terminal=False)
    config["linux"].update(cgroupsPath=f"{v1_base}/runc", resources=resources)
    (tmp_path / "config.json").write_text(json.dumps(config))
    runc = ["runc", "--root", str(tmp_path / "state")]
    subprocess.run([*runc, "run", "-d", "ref"], cwd=tmp_path, check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, timeout=CHILD_WAIT)
    try:
        out = subprocess.run([*runc, "events", "--stats", "ref"], check=True, capture_output=True, text=True)
        theirs = json.loads(out.stdout)["data"]
        their_devices = (ROOT / f"devices{v1_base}/runc/devices.list").read_text()
    finally:
        subprocess.run([*runc, "delete", "-f", "ref"], check=False, timeout=CHILD_WAIT)

    group = cgroups.open_cgroup(f"{v1_base}/ours", "ours")
    group.create()
    group.apply(resources | {"devices": container_device_rules(devices)})
    assert sorted((ROOT / f"devices{v1_base}/ours/devices.list").read_text().splitlines()) == sorted(
        their_devices.splitlines())
    child = subprocess.Popen(["sleep", "600"])
    try:
        group.add(child.pid)
        ours = group.stats()
    finally:
        child.kill()
        child.wait()
    assert set(ours) == set(theirs)
    for key in ("cpuset", "pids"):
        assert ours[key] == theirs[key]
    for key in ("usage", "swap", "kernel", "kernelTCP"):
        assert set(ours["memory"][key]) <= set(theirs["memory"][key]) | {"usage", "max"}
        assert ours["memory"][key]["limit"] == theirs["memory"][key]["limit"]
    assert set(ours["memory"]["raw"]) == set(theirs["memory"]["raw"])
    assert set(ours["cpu"]["usage"]) | {"total"} == set(theirs["cpu"]["usage"]) | {"total"}


# --- cgroup v2 ------------------------------------------------------------------------------------------------

@needs_v2
def test_v2_lifecycle(v2_root: Path) -> None:
    group = cgroups.open_cgroup("/c1", "c1", root=v2_root)
    assert isinstance(group, V2Cgroup) and group.paths() == {"": str(v2_root / "c1")}
    group.create()
    assert group.exists()
    child = subprocess.Popen(["sleep", "600"])
    try:
        group.add(child.pid)
        assert group.pids() == [child.pid]
        group.freeze()
        assert "frozen 1" in (v2_root / "c1/cgroup.events").read_text().splitlines()
        assert group.state() == "frozen"
        group.thaw()
        assert "frozen 0" in (v2_root / "c1/cgroup.events").read_text().splitlines()
        assert group.state() == "running"
        stats = group.stats()
        assert stats["pids"] == {"current": 1}  # counted from cgroup.procs: no pids controller here
        group.kill_all(signal.SIGKILL)  # through cgroup.kill
        assert child.wait(timeout=CHILD_WAIT) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    group.destroy()
    group.destroy()
    assert not group.exists()


@needs_v2
def test_v2_kill_all_with_another_signal_freezes_around_it(v2_root: Path) -> None:
    group = cgroups.open_cgroup("/c", "c", root=v2_root)
    group.create()
    child = subprocess.Popen(["sleep", "600"])
    try:
        group.add(child.pid)
        group.kill_all(signal.SIGTERM)
        assert child.wait(timeout=CHILD_WAIT) == -signal.SIGTERM
        assert group.state() == "running"
    finally:
        child.kill()
        child.wait()


@needs_v2
def test_v2_device_rules_are_enforced_by_ebpf(v2_root: Path) -> None:
    group = cgroups.open_cgroup("/c", "c", root=v2_root)
    group.create()
    group.apply({"devices": DENY_BUT_NULL})
    assert _run_in(group, OPEN_DEVICES) == (0, "ok denied denied ")
    group.apply({"devices": ALSO_READ_ZERO})  # replaces the filter rather than stacking a second one
    assert _run_in(group, OPEN_DEVICES) == (0, "ok ok denied ")
    directory = os.open(v2_root / "c", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert len(syscalls.bpf_device_filter_ids(directory)) == 1
    finally:
        os.close(directory)


@needs_v2
def test_v2_limit_without_its_controller_names_file_and_controller(v2_root: Path) -> None:
    group = cgroups.open_cgroup("/c", "c", root=v2_root)
    group.create()
    if "memory" in (v2_root / "c/cgroup.controllers").read_text().split():
        pytest.skip("memory is delegated here")
    with pytest.raises(CgroupError, match=r"memory\.max.*memory controller"):
        group.apply({"memory": {"limit": 1 << 30}})
