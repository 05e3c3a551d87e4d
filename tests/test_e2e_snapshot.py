"""Boot snapshots: restored VMs must be as good as cold-booted ones, and not copies of each other."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import Cli

pytestmark = pytest.mark.e2e


def run_out(cli: Cli, *args: str) -> str:
    out = cli("run", "--rm", "hello", *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_restored_vms_do_not_share_random_state_or_a_stale_clock(cli: Cli, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROPOD_SNAPSHOT_DIR", str(tmp_path / "snapshots"))
    run_out(cli, "true")  # builds the snapshot
    assert len(list((tmp_path / "snapshots").glob("*.qemu"))) == 1
    probe = "cat /proc/sys/kernel/random/uuid; head -c 16 /dev/urandom | od -An -tx1; date +%s"
    first, second = (run_out(cli, "sh", "-c", probe).split("\n", 2) for _ in range(2))
    assert first[0] != second[0], "two restored VMs produced the same random uuid"
    assert first[1] != second[1], "two restored VMs read the same bytes from /dev/urandom"
    assert abs(int(second[2].strip()) - time.time()) < 30, "the restored guest's clock is stale"


def ram_mappings(pid: int) -> set[str]:
    """The inodes of the snapshot RAM memfds a QEMU maps."""
    return {line.split()[4] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if "/memfd:micropod-ram-" in line}


def vmm_pid(cli: Cli, name: str) -> int:
    return int(json.loads(cli("inspect", name).stdout)[0]["State"]["Pid"])


@pytest.mark.parametrize("shared", ["1", "0"])
def test_restored_vms_map_one_sealed_copy_of_the_ram_unless_told_not_to(
        cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared: str) -> None:
    monkeypatch.setenv("MICROPOD_SNAPSHOT_DIR", str(tmp_path / "snapshots"))
    monkeypatch.setenv("MICROPOD_SHARED_RAM", shared)
    run_out(cli, "true")  # builds the snapshot
    for name in ("a", "b"):
        assert cli("run", "-d", "--name", name, "hello", "sleep", "600").returncode == 0
    first, second = ram_mappings(vmm_pid(cli, "a")), ram_mappings(vmm_pid(cli, "b"))
    assert len(first) == len(second) == 1
    assert (first == second) == (shared == "1"), (first, second)
    assert len(list((tmp_path / "snapshots").glob("*.holder"))) == (1 if shared == "1" else 0)
    done = cli("exec", "b", "sh", "-c", "echo $((6 * 7))")
    assert (done.returncode, done.stdout) == (0, "42\n"), done.stderr
    assert cli("rm", "-f", "a", "b").returncode == 0


def test_cold_boot_when_snapshots_are_off(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROPOD_SNAPSHOTS", "0")
    monkeypatch.setenv("MICROPOD_SNAPSHOT_DIR", str(tmp_path / "snapshots"))
    assert run_out(cli, "echo", "cold") == "cold\n"
    assert not (tmp_path / "snapshots").exists()


def test_a_broken_snapshot_is_dropped_and_the_run_boots_cold(cli: Cli, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    snapshots = tmp_path / "snapshots"
    monkeypatch.setenv("MICROPOD_SNAPSHOT_DIR", str(snapshots))
    run_out(cli, "true")
    [saved] = snapshots.glob("*.qemu")
    saved.write_bytes(b"QEVM garbage")
    assert run_out(cli, "echo", "survived") == "survived\n"
    assert not saved.exists() or saved.read_bytes() != b"QEVM garbage"


def test_snapshots_are_per_machine_shape(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROPOD_SNAPSHOT_DIR", str(tmp_path / "snapshots"))
    assert run_out(cli, "nproc") == "1\n"
    out = cli("run", "--rm", "--cpus", "2", "--memory", "320M", "hello", "nproc")
    assert (out.returncode, out.stdout) == (0, "2\n"), out.stderr
    assert len(list((tmp_path / "snapshots").glob("*.qemu"))) == 2


def test_pods_resume_from_their_own_snapshot_and_are_not_copies(cli: Cli, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod's VM (its SCSI controller, its cmdline) restores a snapshot of its own machine shape; containers
    added after the restore get disks hot-added as after a cold boot, and two pods' guests differ."""
    monkeypatch.setenv("MICROPOD_SNAPSHOT_DIR", str(tmp_path / "snapshots"))
    probe = "cat /proc/sys/kernel/random/uuid; head -c 16 /dev/urandom | od -An -tx1; date +%s"
    seen = []
    for name in ("one", "two"):
        assert cli("pod", "create", "--name", name).returncode == 0
        out = cli("run", "--rm", "--pod", name, "hello", "sh", "-c", probe)
        assert out.returncode == 0, out.stderr
        seen.append(out.stdout.split("\n", 2))
        assert cli("pod", "rm", "-f", name, timeout=120).returncode == 0
    assert len(list((tmp_path / "snapshots").glob("*.qemu"))) == 1  # the pods' shape, saved once
    first, second = seen
    assert first[0] != second[0] and first[1] != second[1], "two restored pod VMs share their random state"
    assert abs(int(second[2].strip()) - time.time()) < 30, "the restored pod guest's clock is stale"


def test_first_boots_resume_with_the_images_root_ready_each_on_its_own_pristine_layer(
        cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """micropod/vmm/rootsnap.py: the image's root is mounted in the snapshot; each container gets its own copy
    of the pristine layer, its own hostname and environment, and a restarted one keeps what it wrote."""
    snapshots = tmp_path / "snapshots"
    monkeypatch.setenv("MICROPOD_SNAPSHOT_DIR", str(snapshots))
    assert run_out(cli, "true") == ""
    [saved] = snapshots.glob("*.qemu")
    assert saved.with_suffix(".upper").exists(), sorted(p.name for p in snapshots.iterdir())
    probe = "hostname; echo $GREETING; ls /written 2>&1; echo mine > /written"
    seen = []
    for name in ("one", "two"):
        out = cli("run", "--name", name, "-e", f"GREETING=hi-{name}", "hello", "sh", "-c", probe)
        assert out.returncode == 0, out.stderr
        seen.append(out.stdout.splitlines())
    ids = [json.loads(cli("inspect", name).stdout)[0]["Id"] for name in ("one", "two")]
    for (hostname, greeting, listing), name, cid in zip(seen, ("one", "two"), ids, strict=True):
        assert (hostname, greeting) == (cid[:12], f"hi-{name}")
        assert "No such file" in listing, listing  # the second did not get the first's layer
    assert len(list(snapshots.glob("*.qemu"))) == 1  # both resumed the same root-ready snapshot
    # a restarted container has its own layer: it boots from the machine shape's plain snapshot, data kept
    again = cli("start", "-a", "one")
    assert (again.returncode, again.stdout.splitlines()[2]) == (0, "/written"), (again.stdout, again.stderr)
    assert len(list(snapshots.glob("*.qemu"))) == 2 and len(list(snapshots.glob("*.upper"))) == 1


def test_a_root_ready_snapshot_of_a_changed_base_is_never_used(cli: Cli, tmp_path: Path, hello_archive: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    snapshots = tmp_path / "snapshots"
    monkeypatch.setenv("MICROPOD_SNAPSHOT_DIR", str(snapshots))
    run_out(cli, "true")
    # the same image in another state root: a byte-identical base, the same snapshot
    other = Cli(tmp_path / "other-root")
    assert other("load", "-i", str(hello_archive)).returncode == 0
    assert run_out(other, "echo", "shared") == "shared\n"
    assert len(list(snapshots.glob("*.upper"))) == 1
    [base] = (cli.root / "rootfs").glob("*.sqfs")
    with base.open("ab") as f:  # squashfs reads within its own size: the image still works, its bytes differ
        f.write(b"\0" * 4096)
    assert run_out(cli, "echo", "fresh") == "fresh\n"
    assert len(list(snapshots.glob("*.upper"))) == 2  # a new one for the changed base; the old one is not used
    monkeypatch.setenv("MICROPOD_ROOT_SNAPSHOTS", "0")
    assert run_out(cli, "echo", "plain") == "plain\n"
    assert len(list(snapshots.glob("*.upper"))) == 2 and len(list(snapshots.glob("*.qemu"))) == 3
