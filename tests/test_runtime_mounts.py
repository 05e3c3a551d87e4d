"""The container's root and mounts against runc's: a read-only root, masked and read-only paths,
rootfsPropagation, tmpfs and bind mounts with options, and --no-pivot. Helpers and the known_bug convention
are test_runtime_features.py's."""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.runtime_bundle import (  # noqa: F401  (fixtures)
    Runtime,
    both,
    cgroup_subtree_fixture,
    make_bundle,
    removed,
    runc_fixture,
    runtime_fixture,
)
from tests.test_runtime_diff import assert_clean, error_line
from tests.test_runtime_features import run_probe, with_mounts

pytestmark = pytest.mark.runtime

PATHS_PROBE = r"""
touch /rootfile 2>/dev/null; echo "root write $?"
echo "timer_list $(wc -c < /proc/timer_list) passwd $(wc -c < /etc/passwd)"
echo "acpi $(ls -A /proc/acpi | wc -l) firmware $(ls -A /sys/firmware | wc -l)"
(echo x > /proc/sys/kernel/domainname) 2>/dev/null; echo "proc/sys write $?"
touch /tmp/file 2>/dev/null; echo "tmp write $?"
awk '$5 ~ /^\/(proc|sys|tmp|etc)/ && $5 !~ /^\/sys\/fs\/cgroup/ && $6 ~ /^ro/ {print $5}' \
    /proc/self/mountinfo | sort
"""
PATH_VARIANTS: dict[str, dict[str, Any]] = {
    "runc's defaults": {},
    "writable root": {"root": {"readonly": False},
                      "linux": {"maskedPaths": ["/etc/passwd", "/proc/timer_list"],
                                "readonlyPaths": ["/tmp", "/proc/sys"]}},
}


@pytest.mark.parametrize("variant", list(PATH_VARIANTS))
def test_readonly_root_masked_and_readonly_paths(runc: Runtime, runtime: Runtime, tmp_path: Path,
                                                 variant: str) -> None:
    bundle = make_bundle(tmp_path, ["sh", "-c", PATHS_PROBE], **PATH_VARIANTS[variant])

    def observe(rt: Runtime) -> list[str]:
        done = run_probe(rt, bundle)
        for made in ("rootfile", "tmp/file"):
            (bundle / "rootfs" / made).unlink(missing_ok=True)
        return done.stdout.splitlines()

    expected, actual = both(runc, runtime, observe)
    assert actual == expected
    readonly_root = variant == "runc's defaults"
    assert expected[0] == f"root write {int(readonly_root)}"
    assert expected[1].startswith("timer_list 0 passwd ") and (expected[1] == "timer_list 0 passwd 0") is not \
        readonly_root
    assert expected[3:5] == ["proc/sys write 1", "tmp write 1"]
    assert "/proc/sys" in expected[5:] and ("/tmp" in expected[5:]) is not readonly_root


@pytest.fixture(name="shared_source")
def shared_source_fixture(tmp_path: Path) -> Iterator[Path]:
    """A directory that is a shared mount (a bind of itself), unmounted afterwards."""
    source = tmp_path / "shared"
    (source / "late").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(source), str(source)], check=True, timeout=30)
    try:
        subprocess.run(["mount", "--make-shared", str(source)], check=True, timeout=30)
        yield source
    finally:
        subprocess.run(["umount", "-R", str(source)], check=True, timeout=30)


def propagation_fields(mountinfo: str, points: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        if fields[4] in points:
            found[fields[4]] = [re.sub(r":\d+$", "", f) for f in fields[6:fields.index("-")]]
    return found


@pytest.mark.parametrize("propagation", ["", "rslave", "slave", "rshared", "shared", "rprivate", "private",
                                         "unbindable"])
def test_rootfs_propagation(runc: Runtime, runtime: Runtime, tmp_path: Path, shared_source: Path,
                            propagation: str) -> None:
    """After create, a host mount appears under a shared bind source: the container sees it (and how)
    depending on rootfsPropagation."""
    bundle = make_bundle(tmp_path, ["sleep", "1000"], linux={"rootfsPropagation": propagation or None},
                         mounts=with_mounts({"destination": "/data", "type": "bind", "source": str(shared_source),
                                             "options": ["rbind"]}))

    def observe(rt: Runtime) -> Any:
        with removed(rt, "prop"):
            done = rt.run("create", "--bundle", str(bundle), "prop", stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                return done.returncode, len(error_line(done))
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(shared_source / "late")], check=True, timeout=30)
            try:
                mountinfo = Path(f"/proc/{rt.state('prop')['pid']}/mountinfo").read_text()
            finally:
                subprocess.run(["umount", str(shared_source / "late")], check=True, timeout=30)
        assert_clean(rt, bundle)
        return propagation_fields(mountinfo, ("/", "/data", "/data/late"))

    expected, actual = both(runc, runtime, observe)
    assert actual == expected
    if propagation == "unbindable":
        assert expected == (1, 1)  # the rootfs cannot be bound to itself
    elif propagation == "rprivate":
        assert expected == {"/": [], "/data": []}
    else:
        assert expected["/"] == [] and "/data/late" in expected, expected


@pytest.fixture(name="tree")
def tree_fixture(tmp_path: Path) -> Iterator[Path]:
    """A host directory with a file and a tmpfs submount holding another, unmounted afterwards."""
    source = tmp_path / "tree"
    (source / "sub").mkdir(parents=True)
    (source / "top").write_text("top\n")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(source / "sub")], check=True, timeout=30)
    try:
        (source / "sub" / "deep").write_text("deep\n")
        yield source
    finally:
        subprocess.run(["umount", str(source / "sub")], check=True, timeout=30)


MOUNTS_PROBE = r"""
awk '$5 ~ /^\/(scratch|b|rb)(\/|$)/ {print $5, $6, $NF}' /proc/self/mountinfo
echo "scratch mode $(stat -c %a /scratch)"
echo "b/sub [$(ls /b/sub)] rb/sub [$(ls /rb/sub)]"
touch /rb/top 2>/dev/null; echo "rb write $?"
touch /rb/sub/new 2>/dev/null; echo "rb/sub write $?"
"""


def test_tmpfs_and_bind_mounts_with_options(runc: Runtime, runtime: Runtime, tmp_path: Path, tree: Path) -> None:
    bundle = make_bundle(tmp_path, ["sh", "-c", MOUNTS_PROBE], mounts=with_mounts(
        {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "size=1m", "mode=1700"]},
        {"destination": "/b", "type": "bind", "source": str(tree), "options": ["bind", "ro"]},
        {"destination": "/rb", "type": "bind", "source": str(tree), "options": ["rbind", "ro"]}))

    def observe(rt: Runtime) -> list[str]:
        done = run_probe(rt, bundle)
        (tree / "sub" / "new").unlink(missing_ok=True)
        return done.stdout.splitlines()

    expected, actual = both(runc, runtime, observe)
    assert actual == expected
    points = {line.split()[0]: line.split()[1:] for line in expected[:-4]}
    assert sorted(points) == ["/b", "/rb", "/rb/sub", "/scratch"]  # bind leaves the submount out, rbind not
    assert points["/scratch"][0].startswith("rw,nosuid,nodev") and points["/scratch"][1].endswith("mode=1700")
    assert points["/b"][0].startswith("ro") and points["/rb"][0].startswith("ro")
    assert points["/rb/sub"][0].startswith("rw")  # runc 1.1's ro is not recursive (rro is)
    assert expected[-4:] == ["scratch mode 1700", "b/sub [] rb/sub [deep]", "rb write 1", "rb/sub write 0"]


def test_recursive_mount_attributes(runc: Runtime, runtime: Runtime, tmp_path: Path, tree: Path) -> None:
    """rro, rnosuid, rnodev, rnoexec (mount_setattr(2) with AT_RECURSIVE, runc 1.1) reach the submount too."""
    bundle = make_bundle(tmp_path, ["awk", "$5 ~ /^\\/r/ {print $5, $6}", "/proc/self/mountinfo"], mounts=with_mounts(
        {"destination": "/rro", "type": "bind", "source": str(tree), "options": ["rbind", "rro"]},
        {"destination": "/rns", "type": "bind", "source": str(tree), "options": ["rbind", "rnosuid", "rnodev",
                                                                              "rnoexec"]}))
    expected, actual = both(runc, runtime, lambda rt: run_probe(rt, bundle).stdout.splitlines())
    assert actual == expected
    seen = dict(line.split() for line in expected)
    assert sorted(seen) == ["/rns", "/rns/sub", "/rro", "/rro/sub"]
    assert all(seen[p].startswith("ro,") for p in ("/rro", "/rro/sub"))
    assert all({"nosuid", "nodev", "noexec"} <= set(seen[p].split(",")) for p in ("/rns", "/rns/sub"))


def test_tmpcopyup(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sh", "-c", "ls /etc; touch /etc/new && echo writable"], mounts=with_mounts(
        {"destination": "/etc", "type": "tmpfs", "source": "tmpfs", "options": ["tmpcopyup"]}))
    expected, actual = both(runc, runtime, lambda rt: run_probe(rt, bundle).stdout)
    assert actual == expected == "group\npasswd\nwritable\n"
    assert not (bundle / "rootfs" / "etc" / "new").exists()


def test_no_pivot_shows_the_container_the_same_mounts(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["awk", "{print $5}", "/proc/self/mountinfo"])
    expected, actual = both(runc, runtime, lambda rt: sorted(run_probe(rt, bundle, "--no-pivot").stdout.split()))
    assert actual == expected == sorted(run_probe(runc, bundle).stdout.split())


LIBC = ctypes.CDLL(None, use_errno=True)
SYS_STATMOUNT, SYS_LISTMOUNT = 457, 458  # x86_64
NS_GET_MNTNS_ID = (2 << 30) | (8 << 16) | (0xB7 << 8) | 5
PROC_MAGIC, SYSFS_MAGIC = 0x9FA0, 0x62656572


def _syscall(number: int, *args: Any) -> int:
    result = int(LIBC.syscall(number, *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def full_proc_and_sysfs_mounts(ns_path: str) -> list[int]:
    """The superblock magic of each whole-filesystem procfs and sysfs mount in a mount namespace, found with
    listmount(2) and statmount(2), which see the namespace's mounts that are outside its processes' root."""
    fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ns_id = struct.unpack("Q", fcntl.ioctl(fd, NS_GET_MNTNS_ID, bytes(8)))[0]
    finally:
        os.close(fd)
    ids = (ctypes.c_uint64 * 4096)()
    count = _syscall(SYS_LISTMOUNT, struct.pack("IIQQQ", 32, 0, (1 << 64) - 1, 0, ns_id), ids, len(ids), 0)
    found = []
    for mount_id in ids[:count]:
        buf = ctypes.create_string_buffer(1 << 16)  # STATMOUNT_SB_BASIC | STATMOUNT_MNT_ROOT
        _syscall(SYS_STATMOUNT, struct.pack("IIQQQ", 32, 0, mount_id, 0x1 | 0x8, ns_id), buf, len(buf), 0)
        magic, root_at = struct.unpack_from("Q", buf.raw, 24)[0], struct.unpack_from("I", buf.raw, 104)[0]
        if magic in (PROC_MAGIC, SYSFS_MAGIC) and buf.raw[512 + root_at:512 + root_at + 2] == b"/\0":
            found.append(magic)
    return sorted(found)


def test_no_pivot_leaves_no_host_proc_or_sysfs(runc: Runtime, runtime: Runtime, tmp_path: Path) -> None:
    """Without pivot_root the old root stays in the container's mount namespace. A whole procfs or sysfs of
    the host's left in it lets the kernel allow the container to mount a fresh, unmasked one; runc 1.1 unmounts
    them first (msMoveRoot)."""
    try:
        full_proc_and_sysfs_mounts("/proc/self/ns/mnt")
    except OSError as exc:
        pytest.skip(f"listmount/statmount with mount namespace ids (Linux 6.11): {exc}")
    bundle = make_bundle(tmp_path, ["sleep", "1000"])

    def observe(rt: Runtime) -> list[int]:
        with removed(rt, "nopivot"):
            rt.run("create", "--no-pivot", "--bundle", str(bundle), "nopivot", check=True, stdin=subprocess.DEVNULL)
            return full_proc_and_sysfs_mounts(f"/proc/{rt.state('nopivot')['pid']}/ns/mnt")

    expected, actual = both(runc, runtime, observe)
    assert actual == expected == [PROC_MAGIC, SYSFS_MAGIC]  # the container's own /proc and /sys
