"""Host path mounts over the CRI: bound into the sandbox's shared directory on the host (a running VM takes
no new device), seen in the container, read-only held, and gone from the host's mounts with the container
and the sandbox, while the host's files stay."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from tests.conftest import Cli
from tests.cri_client import CriServer, code_of, pb
from tests.test_e2e_cri import BOOT, container, kubelet, sandbox  # noqa: F401  (kubelet: a fixture)

pytestmark = pytest.mark.e2e


def mounted_under(path: Path) -> list[str]:
    """The host paths bound below ``path`` (a sandbox's shared directory, itself a tmpfs, not counted)."""
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(str(path)) and not line.split()[4].endswith("/shared")]


def shares_under(path: Path) -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(str(path)) and line.split()[4].endswith("/shared")
            and " - tmpfs " in line]


def test_host_paths_are_seen_inside_and_leave_the_host_intact(kubelet: CriServer, tmp_path: Path) -> None:  # noqa: F811
    rt = kubelet.runtime
    data, config_file = tmp_path / "data", tmp_path / "settings.conf"
    data.mkdir()
    (data / "from-host").write_text("host-data\n")
    config_file.write_text("setting=1\n")
    logs = tmp_path / "logs"
    (logs / "app").mkdir(parents=True)
    config = sandbox(logs)
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=BOOT).pod_sandbox_id
    app = rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, sandbox_config=config, config=container(
        "app", "exec sleep 3600", mounts=[
            pb.Mount(host_path=str(data), container_path="/data"),
            pb.Mount(host_path=str(config_file), container_path="/etc/app/settings.conf", readonly=True)]))
    ).container_id
    rt.StartContainer(pb.StartContainerRequest(container_id=app), timeout=BOOT)
    seen = rt.ExecSync(pb.ExecSyncRequest(container_id=app, cmd=["sh", "-c", (
        "cat /data/from-host /etc/app/settings.conf; echo guest-data > /data/from-guest; "
        "echo x >> /etc/app/settings.conf && echo WROTE-RO")], timeout=30), timeout=60)
    out = seen.stdout.decode()
    assert out.startswith("host-data\nsetting=1\n") and "WROTE-RO" not in out, (out, seen.stderr)
    assert (data / "from-guest").read_text() == "guest-data\n"
    assert config_file.read_text() == "setting=1\n"
    pod_dir = kubelet.root / "pods" if (kubelet.root / "pods").exists() else kubelet.root
    assert len(mounted_under(pod_dir.resolve())) == 2, mounted_under(pod_dir.resolve())
    assert len(shares_under(pod_dir.resolve())) == 1  # the guest's writes to the share fill a small tmpfs only
    # QEMU is still its own uid in its jail, where the binds made after boot reached it through the shared mount
    vmm = json.loads(Cli(kubelet.root)("pod", "inspect", sid).stdout)[0]["VM"]["VmmPid"]
    uid = next(line.split()[1] for line in Path(f"/proc/{vmm}/status").read_text().splitlines()
               if line.startswith("Uid:"))
    assert uid != "0" and (data / "from-guest").stat().st_uid == int(uid)
    assert len(list(Path(f"/proc/{vmm}/root/shares").iterdir())) == 1

    code, details = code_of(lambda: rt.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, config=container("bad", "true", mounts=[
            pb.Mount(host_path=str(tmp_path / "missing"), container_path="/x")]))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "does not exist" in details, details

    rt.StopContainer(pb.StopContainerRequest(container_id=app, timeout=0), timeout=60)
    rt.RemoveContainer(pb.RemoveContainerRequest(container_id=app), timeout=60)
    assert not mounted_under(pod_dir.resolve())
    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    assert sorted(p.name for p in data.iterdir()) == ["from-guest", "from-host"]
    assert config_file.read_text() == "setting=1\n"


def test_removing_a_sandbox_with_a_bound_host_path_keeps_the_host_files(kubelet: CriServer, tmp_path: Path) -> None:  # noqa: F811
    """The sandbox's directory goes recursively: every host path bound in it must be unmounted first."""
    rt = kubelet.runtime
    data = tmp_path / "data"
    data.mkdir()
    (data / "precious").write_text("keep\n")
    logs = tmp_path / "logs"
    (logs / "app").mkdir(parents=True)
    config = sandbox(logs)
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=BOOT).pod_sandbox_id
    rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, sandbox_config=config, config=container(
        "app", "exec sleep 3600", mounts=[pb.Mount(host_path=str(data), container_path="/data")])))
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    assert (data / "precious").read_text() == "keep\n"
    assert not mounted_under((kubelet.root / "pods").resolve()) and not shares_under(kubelet.root.resolve())


def test_devices_of_the_vms_own_kernel_and_refusals_of_the_hosts(kubelet: CriServer, tmp_path: Path) -> None:  # noqa: F811
    """CreateContainer's devices name devices of the guest (micropod/agent/devices.py): TUN is given, as a node
    and a devices-cgroup rule; a host disk is refused before any VM is asked."""
    rt = kubelet.runtime
    logs = tmp_path / "logs"
    (logs / "tun").mkdir(parents=True)
    config = sandbox(logs)
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=BOOT).pod_sandbox_id
    code, details = code_of(lambda: rt.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=config, config=container("disk", "true", devices=[
            pb.Device(host_path="/dev/vda", container_path="/dev/vda", permissions="rw")]))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "cannot be passed into a microVM" in details, details
    tun = rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, sandbox_config=config, config=container(
        "tun", "exec sleep 3600", devices=[pb.Device(host_path="/dev/net/tun", container_path="/dev/net/tun",
                                                   permissions="rw")]))).container_id
    rt.StartContainer(pb.StartContainerRequest(container_id=tun), timeout=BOOT)
    seen = rt.ExecSync(pb.ExecSyncRequest(container_id=tun, cmd=["sh", "-c", (
        "stat -c '%t:%T' /dev/net/tun; cat /dev/net/tun 2>&1; ls /dev/fuse 2>&1")], timeout=30), timeout=60)
    lines = seen.stdout.decode().splitlines()
    assert lines[0] == "a:c8", lines  # 10:200 in hex: the guest's TUN driver
    assert "File descriptor in bad state" in lines[1], lines  # opened: the driver answers, no interface yet
    assert "No such file" in lines[2], lines  # only what was asked for
    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
