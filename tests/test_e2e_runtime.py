"""Inside a real VM, every container runs through micropod-runtime: its own namespaces, docker's capabilities
and seccomp profile, a device cgroup that keeps the host channel out of reach; --privileged lifts it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Cli

pytestmark = pytest.mark.e2e

WAIT = 300

# What the container sees, one line each; the host channel's device (the virtio-serial port) is looked up in
# sysfs, made with mknod (docker's default set has CAP_MKNOD) and opened.
PROBE = r"""
echo "pids $(ls /proc | grep -c '^[0-9]')"
echo "agent $(cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\0' ' ' | grep -c 'micropod[.]agent')"
grep -E '^(CapEff|Seccomp):' /proc/self/status | tr '\t' ' '
unshare -U true 2>/dev/null; echo "unshare $?"
chown 1:1 /tmp 2>/dev/null; echo "chown $?"
echo "vport-nodes $(ls /dev | grep -c vport)"
dev=$(cat /sys/class/virtio-ports/*/dev 2>/dev/null | head -n 1)
mknod /tmp/port c ${dev%%:*} ${dev##*:} 2>/dev/null && ( : < /tmp/port ) 2>/dev/null; echo "open-port $?"
"""


def probe(cli: Cli, *options: str) -> dict[str, str]:
    out = cli("run", "--rm", "--network", "none", *options, "hello", "sh", "-c", PROBE, timeout=WAIT)
    assert out.returncode == 0, out.stderr
    return dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)


def test_a_container_is_confined_by_default_and_privileged_lifts_it(cli: Cli) -> None:
    seen = probe(cli)
    assert int(seen["pids"]) <= 8 and seen["agent"] == "0", seen  # its own pid namespace: no agent in sight
    assert seen["CapEff:"] == "00000000a80425fb", seen  # docker's 14 default capabilities
    assert seen["Seccomp:"] == "2", seen
    assert seen["unshare"] != "0", seen  # docker's profile refuses CLONE_NEWUSER without CAP_SYS_ADMIN
    assert seen["chown"] == "0", seen
    assert seen["vport-nodes"] == "0" and seen["open-port"] != "0", seen  # the device cgroup denies it

    dropped = probe(cli, "--cap-drop", "ALL")
    assert dropped["chown"] != "0" and dropped["CapEff:"] == "0000000000000000", dropped

    privileged = probe(cli, "--privileged")
    assert privileged["Seccomp:"] == "0" and privileged["unshare"] == "0" and privileged["chown"] == "0", privileged
    assert int(privileged["CapEff:"], 16) & (1 << 21), privileged  # CAP_SYS_ADMIN


def test_bad_security_options_are_one_line_before_any_vm_boots(cli: Cli) -> None:
    for options, message in ((("--cap-add", "FOO"), "unknown capability: 'FOO'"),
                             (("--security-opt", "apparmor=x"), "invalid --security-opt")):
        out = cli("run", "--rm", "--network", "none", *options, "hello", "true")
        assert out.returncode == 125 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert cli("ps", "-aq").stdout == ""


def _vmm_seccomp(cli: Cli, name: str) -> str:
    import json

    pid = json.loads(cli("inspect", name).stdout)[0]["State"]["Pid"]
    with open(f"/proc/{pid}/status") as status:
        return next(line.split()[1] for line in status if line.startswith("Seccomp:"))


def test_the_vmm_runs_in_a_seccomp_sandbox_unless_confinement_is_lifted(cli: Cli) -> None:
    assert cli("run", "-d", "--name", "boxed", "hello", "sleep", "300", timeout=WAIT).returncode == 0
    assert _vmm_seccomp(cli, "boxed") == "2"
    lifted = cli("run", "-d", "--name", "open", "--security-opt", "vmm-confinement=off", "hello", "sleep", "300",
                 timeout=WAIT)
    assert lifted.returncode == 0, lifted.stderr
    assert _vmm_seccomp(cli, "open") == "0"
    bad = cli("run", "--rm", "--security-opt", "vmm-confinement=maybe", "hello", "true")
    assert bad.returncode == 125 and "vmm-confinement=on|off" in bad.stderr


def test_pids_limit_and_the_writable_layers_size(cli: Cli) -> None:
    script = ("cat /sys/fs/cgroup/pids.max; df -k / | tail -1; "
              "(for i in 1 2 3 4 5 6 7 8; do sleep 2 & done; wait) 2>/dev/null; echo forks $?")
    seen = cli("run", "--rm", "--pids-limit", "4", "--storage-opt", "size=64m", "hello", "sh", "-c", script,
               timeout=WAIT)
    assert seen.returncode == 0, seen.stderr
    lines = seen.stdout.splitlines()
    assert lines[0] == "4" and lines[2] != "forks 0", lines  # the fifth process could not be forked
    assert int(lines[1].split()[1]) < 70 * 1024, lines  # the overlay's upper is the 64 MiB ext4
    bad = cli("run", "--rm", "--storage-opt", "size=1m", "hello", "true")
    assert bad.returncode == 125 and "at least 16 MiB" in bad.stderr, bad.stderr


def _cgroup_file(pid: int, controller: str, name: str) -> Path:
    """A file of the cgroup ``pid`` is in for ``controller`` (v1 here; v2 hosts have one hierarchy)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path("/sys/fs/cgroup", controller, path.lstrip("/"), name)
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            return Path("/sys/fs/cgroup", path.lstrip("/"), name)
    raise AssertionError(f"pid {pid} is in no {controller} cgroup")


def test_the_vmm_gets_a_host_cgroup_capped_by_cpus_and_memory(cli: Cli) -> None:
    import json

    from micropod.monitor.hostcgroup import OVERHEAD_MIB

    assert cli("run", "-d", "--name", "half", "--cpus", "0.5", "-m", "128M", "hello", "sleep", "300",
               timeout=WAIT).returncode == 0
    pid = json.loads(cli("inspect", "half").stdout)[0]["State"]["Pid"]
    quota, limit = _cgroup_file(pid, "cpu", "cpu.cfs_quota_us"), _cgroup_file(pid, "memory", "memory.limit_in_bytes")
    assert quota.read_text().strip() == "50000"  # half of the 100 ms period: half a CPU, on one vCPU
    assert int(limit.read_text()) == (128 + OVERHEAD_MIB) << 20
    assert cli("rm", "-f", "half", timeout=120).returncode == 0
    assert not quota.parent.exists() and not limit.parent.exists()


def test_a_device_of_the_vms_kernel_is_given_with_the_access_asked_for(cli: Cli) -> None:
    """run --device: FUSE, read-only in the devices cgroup ("r"): it opens for reading, not for writing; a device
    of the host is one line, and no VM boots."""
    script = ("stat -c '%t:%T' /dev/fuse; (exec 3</dev/fuse) && echo read-ok; "
              "(exec 3>/dev/fuse) 2>/dev/null || echo write-refused")
    done = cli("run", "--rm", "--device", "/dev/fuse:/dev/fuse:r", "hello", "sh", "-c", script, timeout=WAIT)
    assert (done.returncode, done.stdout) == (0, "a:e5\nread-ok\nwrite-refused\n"), done.stderr  # 10:229
    refused = cli("run", "--rm", "--device", "/dev/sda", "hello", "true")
    assert refused.returncode == 125 and "cannot be passed into a microVM" in refused.stderr, refused.stderr
    assert refused.stderr.count("\n") == 1 and cli("ps", "-aq").stdout == ""
