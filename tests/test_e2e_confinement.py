"""The confined QEMU in real VMs: a uid of its own, its seccomp sandbox, a mount namespace that holds only /usr,
a few devices and the VM's kernel, and everything else by descriptor (micropod/vmm/qemu_confined.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from micropod.runconfig import bind_tag
from micropod.unixsock import SocketDir
from micropod.vmm.qmp import QmpClient
from tests.conftest import Cli
from tests.test_e2e_run import one_line_error

pytestmark = pytest.mark.e2e

WAIT = 300


def vmm_of(cli: Cli, name: str) -> tuple[int, str]:
    info = json.loads(cli("inspect", name).stdout)[0]
    return int(info["State"]["Pid"]), str(info["Id"])


def status(pid: int) -> dict[str, str]:
    fields = (line.partition(":\t") for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: value.split()[0] if value.split() else "" for key, _, value in fields}


def test_each_vmm_runs_as_its_own_uid_in_a_jail_with_no_host_file_in_reach(cli: Cli) -> None:
    for name in ("one", "two"):
        assert cli("run", "-d", "--name", name, "hello", "sleep", "600", timeout=WAIT).returncode == 0
    (pid_one, vm_one), (pid_two, _) = vmm_of(cli, "one"), vmm_of(cli, "two")
    one, two = status(pid_one), status(pid_two)
    assert one["Uid"] != "0" and one["Gid"] == one["Uid"] and one["Seccomp"] == "2", one
    assert one["Uid"] != two["Uid"], (one["Uid"], two["Uid"])
    assert sorted(os.listdir(f"/proc/{pid_one}/root")) == ["bin", "dev", "lib", "lib64", "proc", "sbin", "tmp",
                                                           "usr", "vmlinux"]
    # its /proc (for its guest RAM's /proc/self/fd/N) has processes only: no sysctl, kcore, keys or mounts
    assert all(entry.isdigit() or entry in ("self", "thread-self") for entry in
               os.listdir(f"/proc/{pid_one}/root/proc")), os.listdir(f"/proc/{pid_one}/root/proc")
    # what QEMU is asked over QMP to open by name, it cannot: no host file is in its namespace
    sockets = SocketDir(cli.root / "vms" / vm_one)
    qmp = QmpClient(sockets.address("qmp.sock"))
    try:
        for path in ("/etc/shadow", "/etc/passwd", str(cli.root / "state.db")):
            with pytest.raises(Exception, match="Could not open"):
                qmp.execute("blockdev-add", driver="file", filename=path, **{"node-name": "probe"})
    finally:
        qmp.close()
        sockets.close()
    # and the VM works as ever: its disks, its agent channel, exec
    done = cli("exec", "one", "sh", "-c", "echo kept > /f && cat /f", timeout=WAIT)
    assert (done.returncode, done.stdout) == (0, "kept\n"), done.stderr
    lifted = cli("run", "-d", "--name", "open", "--security-opt", "vmm-confinement=off", "hello", "sleep", "600",
                 timeout=WAIT)
    assert lifted.returncode == 0, lifted.stderr
    assert status(vmm_of(cli, "open")[0])["Uid"] == "0"


def test_an_exhausted_or_malformed_uid_range_is_one_clear_line(cli: Cli) -> None:
    os.environ["MICROPOD_VMM_IDS"] = "3999990-3999990"
    try:
        assert cli("run", "-d", "--name", "holder", "hello", "sleep", "600", timeout=WAIT).returncode == 0
        refused = cli("run", "--rm", "hello", "true", timeout=WAIT)
        os.environ["MICROPOD_VMM_IDS"] = "lots"
        malformed = cli("run", "--rm", "hello", "true", timeout=WAIT)
    finally:
        del os.environ["MICROPOD_VMM_IDS"]
    assert refused.returncode == 125
    assert "no uid is free for another VMM in MICROPOD_VMM_IDS=3999990-3999990" in one_line_error(refused.stderr)
    assert malformed.returncode == 125 and "invalid MICROPOD_VMM_IDS 'lots'" in one_line_error(malformed.stderr)
    assert cli("ps", "-aq").stdout.split() == [vmm_of(cli, "holder")[1][:12]]  # --rm left nothing behind



def test_a_vm_with_a_bind_mount_keeps_qemu_jailed_with_only_the_share_in_reach(cli: Cli, tmp_path: Path) -> None:
    """A host directory shared over virtio-9p is bound into the jail: QEMU stays its own uid, holding only
    CAP_DAC_OVERRIDE (to reach a root-owned 0700 directory, as the user who shared it can), and nothing else
    of the host is in reach; `:ro` is read-only in the jail as well as in QEMU."""
    shared, read_only, outside = tmp_path / "shared", tmp_path / "read-only", tmp_path / "outside"
    for directory in (shared, read_only, outside):
        directory.mkdir(mode=0o700)
    (shared / "from-host").write_text("host\n")
    (read_only / "kept").write_text("kept\n")
    (outside / "secret").write_text("no\n")
    (read_only / "sub").mkdir()
    later = shared / "later"
    later.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "sub", str(read_only / "sub")], check=True)
    try:
        shares_held_apart(cli, shared, read_only, outside, later)
    finally:
        for mounted in (later, read_only / "sub"):
            subprocess.run(["umount", "-l", str(mounted)], capture_output=True)


def shares_held_apart(cli: Cli, shared: Path, read_only: Path, outside: Path, later: Path) -> None:
    started = cli("run", "-d", "--name", "binder", "-v", f"{shared}:/h", "-v", f"{read_only}:/ro:ro", "hello",
                  "sleep", "600", timeout=WAIT)
    assert started.returncode == 0, started.stderr
    # a host mount made under a share after boot stays out of the jail (its copy of the share is private)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "later", str(later)], check=True)
    pid, _ = vmm_of(cli, "binder")
    seen = status(pid)
    assert seen["Uid"] != "0" and seen["Seccomp"] == "2", seen
    assert seen["Seccomp_filters"] == "2", seen  # QEMU's own, and the set-id guard (test_vmm_setid_guard.py)
    dac_override = f"{1 << 1:016x}"
    assert (seen["CapEff"], seen["CapPrm"], seen["CapBnd"], seen["CapAmb"]) == (dac_override,) * 4, seen
    jail = Path(f"/proc/{pid}/root")
    assert sorted(os.listdir(jail / "shares")) == [bind_tag(0), bind_tag(1)]
    reachable = set()
    for top, dirs, files in os.walk(jail):
        if Path(top) == jail:
            dirs[:] = [d for d in dirs if d not in ("usr", "proc")]
        reachable |= set(files)
    assert "secret" not in reachable and "from-host" in reachable and "kept" in reachable
    done = cli("exec", "binder", "sh", "-c", "cat /h/from-host /ro/kept; echo guest > /h/from-guest; "
               "echo x > /ro/kept && echo WROTE-RO", timeout=WAIT)
    assert done.stdout.startswith("host\nkept\n") and "WROTE-RO" not in done.stdout, (done.stdout, done.stderr)
    made = shared / "from-guest"
    assert (made.stat().st_uid, made.read_text()) == (int(seen["Uid"]), "guest\n")
    assert (read_only / "kept").read_text() == "kept\n"
    # the jail's bind is read-only too, and so is every mount below it, nosuid and nodev: a QEMU that ignored
    # readonly=on still could not write there, nor open a device node of the host through a share
    jail_mounts = {line.split()[4]: line.split()[5].split(",") for line in
                   Path(f"/proc/{pid}/mountinfo").read_text().splitlines() if line.split()[4].startswith("/shares/")}
    assert set(jail_mounts) == {f"/shares/{bind_tag(0)}", f"/shares/{bind_tag(1)}", f"/shares/{bind_tag(1)}/sub"}
    for point, options in jail_mounts.items():
        assert {"nosuid", "nodev"} <= set(options) and (options[0] == "ro") == (bind_tag(1) in point), (point, options)


def test_a_cold_booted_vm_writes_to_its_share_too(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU's 9p server sets a new file's xattrs through /proc/self/fd/N/NAME: the jail has its /proc for a share,
    not only for a snapshot's RAM (a cold-booted VM's guest got ENOENT on every create)."""
    monkeypatch.setenv("MICROPOD_SNAPSHOTS", "0")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o700)
    done = cli("run", "--rm", "-v", f"{shared}:/h", "hello", "sh", "-c", "echo cold > /h/made", timeout=WAIT)
    assert done.returncode == 0, done.stderr
    assert (shared / "made").read_text() == "cold\n"
