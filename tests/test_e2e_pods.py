"""Pods in real VMs under QEMU: one microVM holds several containers, each in its own namespaces and cgroup,
all on the pod's network; containers join the running VM on hot-added disks (micropod/monitor/pod.py)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import sqlite3
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from micropod.image.archive import LayoutWriter
from micropod.image.demo import BUSYBOX, build_demo_layer, demo_config
from micropod.image.model import OCI_LAYER_GZIP, Platform
from micropod.runtime.cgroups import cpu_weight_from_shares
from tests.conftest import Cli
from tests.nettopo import HOST_IP, Topology
from tests.test_e2e_net import NOTHING, fetch, leftovers, world  # noqa: F401  (world is a fixture)
from tests.test_e2e_run import one_line_error, wait_for

pytestmark = pytest.mark.e2e

WAIT = 300
SECOND = "localhost/second:latest"


def second_image(out: Path) -> Path:
    """The demo image and one more layer (/etc/second): another image, with a base of its own."""
    base = build_demo_layer(BUSYBOX.read_bytes())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("etc/second")
        content = b"the second image\n"
        info.size, info.mtime = len(content), 1704067200
        tar.addfile(info, io.BytesIO(content))
    extra = buf.getvalue()
    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in (base, extra)]
    config = demo_config(diff_ids[0])
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    writer = LayoutWriter()
    writer.add_image(config, [(gzip.compress(layer, mtime=0), OCI_LAYER_GZIP) for layer in (base, extra)],
                     [SECOND], platform=Platform("amd64", "linux"))
    return writer.write_archive(out)


def remove_pods(cli: Cli) -> None:
    listed = cli("pod", "ps", "-q", "--no-trunc").stdout.split()
    if listed:
        cli("pod", "rm", "-f", *listed, timeout=120)


@pytest.fixture
def pods(cli: Cli) -> Iterator[Cli]:
    yield cli
    remove_pods(cli)


@pytest.fixture
def pod_world(world: tuple[Topology, Cli]) -> Iterator[tuple[Topology, Cli]]:  # noqa: F811
    yield world
    remove_pods(world[1])


def pod_console(cli: Cli, pod: str) -> str:
    out = cli("pod", "inspect", pod)
    if out.returncode != 0:
        return out.stderr
    pod_id = json.loads(out.stdout)[0]["Id"]
    console = cli.root / "pods" / pod_id / "console.log"
    monitor = cli.root / "pods" / pod_id / "monitor.log"
    return "".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in (monitor, console) if p.exists())


def run_in(cli: Cli, pod: str, name: str, *args: str) -> None:
    out = cli("run", "-d", "--pod", pod, "--name", name, *args, timeout=WAIT)
    assert out.returncode == 0, out.stderr + pod_console(cli, pod)


def sh(cli: Cli, container: str, script: str) -> tuple[int, str]:
    out = cli("exec", container, "sh", "-c", script, timeout=WAIT)
    return out.returncode, out.stdout + out.stderr


def states(cli: Cli) -> dict[str, str]:
    out = cli("ps", "-a", "--format", "json")
    return {item["Names"]: item["Status"] for item in map(json.loads, out.stdout.splitlines())}


def test_a_pods_containers_share_localhost_and_a_volume_but_not_processes_or_files_and_rm_leaves_nothing(
    pod_world: tuple[Topology, Cli],
) -> None:
    topo, cli = pod_world
    made = cli("pod", "create", "--name", "web", "-p", "18080:8080", "--label", "tier=front")
    assert made.returncode == 0, made.stderr
    run_in(cli, "web", "srv", "-v", "shared:/shared", "hello", "sh", "-c",
           "mkdir -p /www && echo pod-page > /www/index.html && echo from-srv > /shared/note && echo srv-up && "
           "exec httpd -f -p 8080 -h /www")
    run_in(cli, "web", "side", "-v", "shared:/shared", "hello", "sleep", "600")
    wait_for(lambda: sh(cli, "side", "cat /shared/note")[1] == "from-srv\n", 60, "the shared volume's note",
             lambda: pod_console(cli, "web"))

    # One network namespace: localhost reaches the other container, and the pod's published port reaches it.
    code, text = sh(cli, "side", "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 127.0.0.1 8080")
    assert code == 0 and "pod-page" in text, text
    assert fetch(topo, topo.outside, f"http://{HOST_IP}:18080/") == "pod-page\n"
    # Their own pid and mount namespaces: neither sees the other's processes or files.
    code, text = sh(cli, "side", "ps -o comm; ls /www 2>&1")
    assert "httpd" not in text and "No such file" in text, text
    # Both are listed, with their pod, and the pod lists them.
    listed = cli("ps", "--pod", "--filter", "pod=web")
    assert listed.returncode == 0 and {"srv", "side"} <= set(listed.stdout.split()), listed.stdout
    assert listed.stdout.splitlines()[0].split()[-1] == "POD"
    summary = json.loads(cli("pod", "ps", "--format", "json").stdout.splitlines()[0])
    assert (summary["Name"], summary["Status"], summary["NumberOfContainers"], summary["Labels"]) == \
        ("web", "running", 2, {"tier": "front"})

    # One exits: its code shows while the others run on.
    run_in(cli, "web", "quitter", "hello", "sh", "-c", "echo bye; exit 7")
    waited = cli("wait", "quitter", timeout=WAIT)
    assert (waited.returncode, waited.stdout) == (0, "7\n"), waited.stderr
    assert states(cli)["quitter"].startswith("Exited (7)"), states(cli)
    assert states(cli)["srv"].startswith("Up") and states(cli)["side"].startswith("Up"), states(cli)
    logs = cli("pod", "logs", "web").stdout.splitlines()
    assert "srv srv-up" in logs and "quitter bye" in logs, logs

    stopped = cli("pod", "stop", "-t", "2", "web", timeout=WAIT)
    assert stopped.returncode == 0, stopped.stderr
    assert all(status.startswith("Exited") for status in states(cli).values()), states(cli)
    assert json.loads(cli("pod", "inspect", "web").stdout)[0]["State"] == "stopped"

    removed = cli("pod", "rm", "web", timeout=WAIT)
    assert removed.returncode == 0, removed.stderr
    assert cli("ps", "-aq").stdout == "" and cli("pod", "ps", "-q").stdout == ""
    assert leftovers(topo, cli.root) == NOTHING
    assert list((cli.root / "pods").iterdir()) == [] and list((cli.root / "vms").iterdir()) == []
    with sqlite3.connect(cli.root / "state.db") as db:
        assert db.execute("SELECT count(*) FROM volume_users").fetchone() == (0,)
        assert db.execute("SELECT holder FROM volumes WHERE name = 'shared'").fetchone() == (None,)


def test_a_container_of_another_image_joins_the_running_pod_without_a_reboot(pods: Cli, tmp_path: Path) -> None:
    cli = pods
    loaded = cli("load", "-i", str(second_image(tmp_path / "second.tar")))
    assert loaded.returncode == 0, loaded.stderr
    assert cli("pod", "create", "--name", "p", "--cpus", "2").returncode == 0
    run_in(cli, "p", "first", "hello", "sleep", "600")
    code, boot_id = sh(cli, "first", "cat /proc/sys/kernel/random/boot_id")
    assert code == 0, boot_id

    run_in(cli, "p", "third", SECOND, "sleep", "600")
    code, text = sh(cli, "third", "cat /etc/second /proc/sys/kernel/random/boot_id")
    assert (code, text) == (0, f"the second image\n{boot_id}"), text  # the same kernel, never rebooted
    assert sh(cli, "first", "cat /etc/second")[0] != 0  # each container has its own image
    copied = cli("cp", "third:/etc/second", str(tmp_path / "copied"), timeout=WAIT)
    assert copied.returncode == 0 and (tmp_path / "copied").read_text() == "the second image\n", copied.stderr

    # Removing a container takes its disks off the VM; another takes the freed slots, and reads its own.
    assert cli("rm", "-f", "third", timeout=WAIT).returncode == 0
    again = cli("run", "--rm", "--pod", "p", SECOND, "sh", "-c", "cat /etc/second /proc/sys/kernel/random/boot_id",
                timeout=WAIT)
    assert (again.returncode, again.stdout) == (0, f"the second image\n{boot_id}"), again.stderr
    assert set(states(cli)) == {"first"}  # --rm removed it

    # A pod's container's --memory and --cpus are its own cgroup's limits in the VM.
    run_in(cli, "p", "limited", "-m", "64M", "--cpus", "0.5", "--cpuset-cpus", "0", "hello", "sleep", "600")
    code, text = sh(cli, "limited", "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max")
    assert (code, text) == (0, f"{64 << 20}\n50000 100000\n"), text
    # stats of a pod's container are its own cgroup's: its memory limit, its one process
    seen = json.loads(cli("stats", "--no-stream", "--format", "json", "limited", timeout=WAIT).stdout)
    assert seen["MemUsage"].endswith("/ 67.1MB") and seen["PIDs"] == "1", seen
    # update: a running pod's container's cgroup takes new limits at once, and keeps them when started again
    updated = cli("update", "-m", "96M", "--cpus", "0.25", "--cpu-shares", "512", "--pids-limit", "40", "limited",
                  timeout=WAIT)
    assert updated.returncode == 0, updated.stderr
    limits_now = "cd /sys/fs/cgroup && cat memory.max cpu.max cpu.weight pids.max"
    updated_limits = f"{96 << 20}\n25000 100000\n{cpu_weight_from_shares(512)}\n40\n"
    assert sh(cli, "limited", limits_now) == (0, updated_limits)
    # a cpuset cleared by an update is all of the VM's at once, not at the next start
    assert sh(cli, "limited", "cat /sys/fs/cgroup/cpuset.cpus") == (0, "0\n")
    assert cli("update", "--cpuset-cpus", "", "limited", timeout=WAIT).returncode == 0
    assert sh(cli, "limited", "cat /sys/fs/cgroup/cpuset.cpus") == (0, "0-1\n")
    refused = cli("update", "--memory-reservation", "32M", "limited", timeout=WAIT)
    assert refused.returncode != 0 and "belong to the pod" in refused.stderr, refused.stderr
    # stop, then start, of a pod's container: the same VM again
    assert cli("stop", "-t", "1", "limited", timeout=WAIT).returncode == 0
    assert states(cli)["limited"].startswith("Exited (137)"), states(cli)
    # cp works on a stopped container of the pod too: the pod's VM mounts its disks for the copy
    (tmp_path / "note").write_text("copied while stopped\n")
    copied_in = cli("cp", str(tmp_path / "note"), "limited:/note", timeout=WAIT)
    assert copied_in.returncode == 0, copied_in.stderr
    copied_out = cli("cp", "limited:/etc/hostname", str(tmp_path / "hostname"), timeout=WAIT)
    assert copied_out.returncode == 0 and (tmp_path / "hostname").read_text() == "p\n", copied_out.stderr
    assert states(cli)["limited"].startswith("Exited (137)"), states(cli)
    assert cli("start", "limited", timeout=WAIT).returncode == 0
    assert sh(cli, "limited", "cat /proc/sys/kernel/random/boot_id") == (0, boot_id)
    assert cli("exec", "limited", "cat", "/note").stdout == "copied while stopped\n"
    assert sh(cli, "limited", limits_now) == (0, updated_limits)
    assert sh(cli, "limited", "cat /sys/fs/cgroup/cpuset.cpus") == (0, "\n")  # and started again, none of its own
    # a pod's container's restart policy: run again in the same VM, with docker's count
    run_in(cli, "p", "flaky", "--restart", "on-failure:2", "hello", "sh", "-c", "echo try; exit 1")

    def flaky() -> dict[str, object]:
        info: dict[str, object] = json.loads(cli("inspect", "flaky").stdout)[0]
        return info

    wait_for(lambda: flaky()["RestartCount"] == 2 and states(cli)["flaky"].startswith("Exited (1)"), 60,
             "flaky's two restarts", lambda: pod_console(cli, "p"))
    assert cli("logs", "flaky").stdout == "try\ntry\ntry\n"
    pod_id = json.loads(cli("pod", "inspect", "p").stdout)[0]["Id"]
    assert flaky()["Pod"] == pod_id
    # pod restart: a new VM, and the pod's containers in it again
    assert cli("pod", "restart", "-t", "1", "p", timeout=WAIT).returncode == 0
    assert states(cli)["first"].startswith("Up") and states(cli)["limited"].startswith("Up"), states(cli)
    code, rebooted = sh(cli, "first", "cat /proc/sys/kernel/random/boot_id")
    assert code == 0 and rebooted != boot_id, rebooted
    assert cli("pod", "kill", "p", timeout=WAIT).returncode == 0
    assert json.loads(cli("pod", "inspect", "p").stdout)[0]["State"] == "stopped"
    assert all(status.startswith("Exited") for status in states(cli).values()), states(cli)


def test_bad_pod_input_is_one_clear_line_and_leaves_nothing_half_made(pods: Cli, tmp_path: Path) -> None:
    cli = pods
    unknown = cli("run", "--rm", "--pod", "nosuch", "hello", "true")
    assert unknown.returncode != 0 and one_line_error(unknown.stderr) == "micropod: error: no such pod: nosuch"
    assert cli("pod", "create", "--name", "small", "--drive-pool", "1").returncode == 0
    duplicate = cli("pod", "create", "--name", "small")
    assert duplicate.returncode != 0 and 'the pod name "small" is already in use' in one_line_error(duplicate.stderr)
    ports = cli("run", "--pod", "small", "-p", "8080:80", "hello", "true")
    assert ports.returncode != 0 and "ports belong to the pod" in one_line_error(ports.stderr)
    bad_pool = cli("pod", "create", "--drive-pool", "0")
    assert bad_pool.returncode != 0 and "invalid --drive-pool 0" in one_line_error(bad_pool.stderr)
    bind = cli("run", "--pod", "small", "-v", f"{tmp_path}:/x", "hello", "true")
    assert bind.returncode != 0 and "use a named volume" in one_line_error(bind.stderr)
    bad_volume = cli("run", "--pod", "small", "-v", "no/such:/x", "hello", "true")
    assert bad_volume.returncode != 0 and "Traceback" not in bad_volume.stderr and bad_volume.stderr.count("\n") == 1
    assert cli("ps", "-aq").stdout == ""

    # A pool of one read-only and one writable disk (two SCSI slots on QEMU) holds one container.
    run_in(cli, "small", "only", "hello", "sleep", "600")
    full = cli("run", "-d", "--pod", "small", "--name", "extra", "hello", "true", timeout=WAIT)
    assert full.returncode != 0 and "drive pool is exhausted" in one_line_error(full.stderr), full.stderr
    assert set(states(cli)) == {"only"} and states(cli)["only"].startswith("Up")  # nothing else changed
    running = cli("pod", "rm", "small")
    assert running.returncode != 0 and "stop it first or use --force" in one_line_error(running.stderr)
    assert cli("pod", "rm", "-f", "small", timeout=WAIT).returncode == 0
    assert cli("ps", "-aq").stdout == "" and list((cli.root / "pods").iterdir()) == []
