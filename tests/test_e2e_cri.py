"""kubelet's side of the CRI, played by a gRPC client on the generated stubs over the real socket: a sandbox is
a real microVM under QEMU; its containers run in it through micropod-runtime (no network: MICROPOD_NETWORK=none)."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from micropod.runtime.cgroups import cpu_weight_from_shares
from tests.conftest import Cli, require_guest
from tests.cri_client import CriServer, code_of, pb
from tests.test_e2e_run import wait_for

pytestmark = pytest.mark.e2e

BOOT = 240


@pytest.fixture
def kubelet(tmp_path: Path, hello_archive: Path) -> Iterator[CriServer]:
    require_guest()
    server = CriServer.over_loaded_root(tmp_path, hello_archive)
    root = server.root
    yield server
    server.stop()
    cli = Cli(root)
    left = cli("pod", "ps", "-q", "--no-trunc").stdout.split()
    if left:
        cli("pod", "rm", "-f", *left, timeout=120)


def sandbox(logs: Path) -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="web", uid="uid-1", namespace="default", attempt=0),
        hostname="webhost", log_directory=str(logs), labels={"app": "web"}, annotations={"note": "kept"},
        dns_config=pb.DNSConfig(servers=["10.96.0.10"], searches=["default.svc.cluster.local"], options=["ndots:5"]),
        linux=pb.LinuxPodSandboxConfig(sysctls=SYSCTLS))


# kubelet's safe sysctls: one of each container's IPC namespace, one of the pod's network (the VM's)
SYSCTLS = {"kernel.shm_rmid_forced": "1", "net.ipv4.ip_local_port_range": "20000\t30000"}


def container(name: str, script: str, **fields: object) -> pb.ContainerConfig:
    return pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image="hello"),
                              command=["sh", "-c", script], log_path=f"{name}/0.log", **fields)  # type: ignore[arg-type]


def restricted() -> pb.LinuxContainerConfig:
    return pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
        run_as_user=pb.Int64Value(value=1000), readonly_rootfs=True,
        capabilities=pb.Capability(drop_capabilities=["ALL"]),
        seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault),
        namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD)))


def test_a_pod_s_whole_life_over_the_cri(kubelet: CriServer, tmp_path: Path) -> None:
    rt = kubelet.runtime
    logs = tmp_path / "logs"
    for name in ("app", "side"):
        (logs / name).mkdir(parents=True)
    config = sandbox(logs)
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=BOOT).pod_sandbox_id
    status = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True))
    assert status.status.state == pb.SANDBOX_READY
    assert dict(status.status.labels) == {"app": "web"} and dict(status.status.annotations) == {"note": "kept"}
    assert json.loads(status.info["info"])["cri"]["reservedName"] == "web_default_uid-1_0"
    listed = [json.loads(line) for line in Cli(kubelet.root)("pod", "ps", "--format", "json").stdout.splitlines()]
    assert [(p["Id"], p["Labels"]) for p in listed] == [(sid, {"app": "web"})]  # the CLI sees the same pod
    code, details = code_of(lambda: rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config)))
    assert code == grpc.StatusCode.UNKNOWN
    assert details == (f'failed to reserve sandbox name "web_default_uid-1_0": name "web_default_uid-1_0" is '
                       f'reserved for "{sid}"')

    app = rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, sandbox_config=config, config=container(
        "app", "echo out-line; echo err-line >&2; while :; do sleep 0.3; echo tick; done", labels={"tier": "front"},
        linux=restricted()))).container_id
    side = rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, sandbox_config=config, config=container(
        "side", "exec sleep 3600", labels={"tier": "back"}))).container_id
    code, details = code_of(lambda: rt.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, config=container("side", "true"))))
    assert code == grpc.StatusCode.UNKNOWN and 'failed to reserve container name "side_web_default_uid-1_0"' in details
    missing = container("ghost", "true")
    missing.image.image = "localhost/nothere:latest"
    code, details = code_of(lambda: rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, config=missing)))
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, 'failed to resolve image "localhost/nothere:latest": '
                                                          'not found')
    assert rt.ContainerStatus(pb.ContainerStatusRequest(container_id=app)).status.state == pb.CONTAINER_CREATED
    for cid in (app, side):
        rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=BOOT)
    assert code_of(lambda: rt.StartContainer(pb.StartContainerRequest(container_id=app)))[0] == grpc.StatusCode.UNKNOWN

    def ids(**filters: object) -> set[str]:
        found = rt.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(**filters))).containers  # type: ignore[arg-type]
        return {c.id for c in found}

    assert ids(label_selector={"tier": "front"}) == {app}
    assert ids(pod_sandbox_id=sid[:12]) == {app, side}
    assert ids(state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING)) == {app, side}

    def exec_in(cid: str, script: str, timeout: int = 60) -> pb.ExecSyncResponse:
        return rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", script], timeout=timeout),
                           timeout=timeout + 30)

    seen = exec_in(app, "id -u; hostname; cat /etc/resolv.conf; grep -E '^(CapEff|Seccomp):' /proc/self/status; "
                        "touch /made-here 2>&1; echo to-stderr >&2; exit 3")
    out = seen.stdout.decode()
    assert seen.exit_code == 3 and seen.stderr == b"to-stderr\n", seen
    assert out.splitlines()[:2] == ["1000", "webhost"], out
    assert "search default.svc.cluster.local" in out and "options ndots:5" in out and "nameserver 10.96.0.10" in out
    assert "CapEff:\t0000000000000000" in out and "Seccomp:\t2" in out
    assert "Read-only file system" in out
    for cid in (app, side):
        seen_sysctls = exec_in(cid, "cat /proc/sys/kernel/shm_rmid_forced /proc/sys/net/ipv4/ip_local_port_range")
        assert seen_sysctls.stdout.decode() == "1\n20000\t30000\n", seen_sysctls
    procs = exec_in(side, "for p in /proc/[0-9]*; do cat $p/comm; done").stdout.decode().split()
    assert "sleep" in procs and "sh" in procs and not any(p in procs for p in ("python3", "tick")), procs
    assert exec_in(side, "cat /proc/1/cmdline | tr '\\0' ' '").stdout.decode().strip() == "sleep 3600"
    code, _ = code_of(lambda: rt.ExecSync(pb.ExecSyncRequest(container_id=side, cmd=["sleep", "30"], timeout=1),
                                          timeout=60))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED

    app_log = logs / "app" / "0.log"
    wait_for(lambda: app_log.exists() and b" stdout F tick\n" in app_log.read_bytes(), 60, "the app's CRI log",
             kubelet.log_tail)
    head = app_log.read_bytes().splitlines()
    assert head[0].endswith(b" stdout F out-line") and head[1].endswith(b" stderr F err-line"), head[:3]
    app_log.rename(logs / "app" / "0.log.1")  # kubelet's rotation: rename, then reopen
    rt.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=app))
    wait_for(lambda: app_log.exists() and b"tick" in app_log.read_bytes(), 60, "the reopened log", kubelet.log_tail)
    assert b"out-line" not in app_log.read_bytes()

    stats = rt.ContainerStats(pb.ContainerStatsRequest(container_id=app)).stats
    assert stats.attributes.id == app and stats.memory.working_set_bytes.value > 0
    assert stats.cpu.usage_core_nano_seconds.value > 0
    listed_stats = rt.ListContainerStats(pb.ListContainerStatsRequest(
        filter=pb.ContainerStatsFilter(pod_sandbox_id=sid))).stats
    assert {s.attributes.id for s in listed_stats} == {app, side}
    pod_stats = rt.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=sid)).stats
    assert pod_stats.linux.memory.working_set_bytes.value > 0 and len(pod_stats.linux.containers) == 2

    # UpdateContainerResources: a running container's cgroup takes the limits at once, and its status has them
    def update(**fields: Any) -> None:
        rt.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
            container_id=side, linux=pb.LinuxContainerResources(**fields)), timeout=60)

    side_limits = "cd /sys/fs/cgroup && cat memory.max cpu.max cpu.weight"
    update(memory_limit_in_bytes=80 << 20, cpu_period=100000, cpu_quota=30000, cpu_shares=256)
    assert exec_in(side, side_limits).stdout.decode() == f"{80 << 20}\n30000 100000\n{cpu_weight_from_shares(256)}\n"
    held = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=side)).status.resources.linux
    assert (held.memory_limit_in_bytes, held.cpu_quota, held.cpu_period, held.cpu_shares) == (80 << 20, 30000,
                                                                                               100000, 256)
    for bad in ({"unified": {"memory.high": "1"}}, {"cpuset_cpus": "7"}):
        code, details = code_of(lambda bad=bad: update(**bad))  # type: ignore[misc]
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    update()  # none: the limits are lifted
    assert exec_in(side, "cd /sys/fs/cgroup && cat memory.max cpu.max").stdout == b"max\nmax 100000\n"

    kubelet.stop(signal.SIGKILL)  # a crashed server loses nothing: the VM runs on under its monitor
    kubelet.start()
    rt = kubelet.runtime
    found = rt.ListPodSandbox(pb.ListPodSandboxRequest(filter=pb.PodSandboxFilter(label_selector={"app": "web"})))
    assert [(s.id, s.state) for s in found.items] == [(sid, pb.SANDBOX_READY)]
    assert exec_in(side, "echo again").stdout == b"again\n"

    rt.StopContainer(pb.StopContainerRequest(container_id=app, timeout=2), timeout=120)
    stopped = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=app)).status
    assert stopped.state == pb.CONTAINER_EXITED and stopped.exit_code != 0 and stopped.reason == "Error"
    assert stopped.finished_at >= stopped.started_at > 0
    assert rt.ContainerStatus(pb.ContainerStatusRequest(container_id=side)).status.state == pb.CONTAINER_RUNNING

    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    assert rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid)).status.state == pb.SANDBOX_NOTREADY
    code, details = code_of(lambda: rt.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, config=container("late", "true"))))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "is not running" in details
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))  # again: still fine
    assert not rt.ListPodSandbox(pb.ListPodSandboxRequest()).items and not ids()
    assert not any((kubelet.root / "pods").iterdir()) and not any((kubelet.root / "vms").iterdir())
    assert Cli(kubelet.root)("ps", "-aq").stdout.strip() == ""
