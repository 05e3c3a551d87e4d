"""Pod lifecycle operations, as plain functions over the state (the CLI's `pod` commands and the CRI use them).

A pod is one VM, run by its own monitor (micropod/monitor/pod.py); its containers are rows of the VMs' table
that name it, each with its own config and log, added to the running VM and removed from it one by one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from typing import Any

from micropod.context import Context
from micropod.errors import (
    ConflictError,
    ContainerCommandError,
    MicropodError,
    NotFoundError,
    TimeoutExpired,
)
from micropod.fsutil import PRIVATE_DIR, private_file
from micropod.liveness import ProcessRef
from micropod.monitor.api import Op
from micropod.monitor.client import MonitorClient
from micropod.names import check_pod_name, generated_name, new_vm_id
from micropod.net import lifecycle as networking
from micropod.net.dns import hosts_file, with_search
from micropod.podconfig import DEFAULT_POOL, SHARED_DIR, PodConfig, check_pool
from micropod.runconfig import NetworkSettings
from micropod.service import podshare
from micropod.state import VmRecord
from micropod.state.pods import POD_ACTIVE, PodRecord, pod_name_in_use

STOP_GRACE = 30.0


@dataclass
class PodRequest:
    name: str | None = None
    publish: tuple[str, ...] = ()
    vcpus: int = 1
    cpu_limit: float = 0.0
    memory_mib: int = 512
    hostname: str | None = None
    dns: tuple[str, ...] = ()
    dns_search: tuple[str, ...] = ()
    dns_options: tuple[str, ...] = ()
    network: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    backend: str = "auto"
    pool: int = DEFAULT_POOL
    boot_timeout: float = 60.0
    vmm_confinement: bool = True
    host_share: bool = False  # a shared directory for containers' host paths, where the VMM has one (QEMU)


def create(ctx: Context, req: PodRequest) -> PodConfig:
    """Record a pod and write its config; its VM boots on `pod start` (or the first `run --pod`)."""
    from micropod.guest.artefacts import locate
    from micropod.vmm.factory import check_available, resolve_backend

    name = check_pod_name(req.name) if req.name else generated_name()
    if ctx.pods.name_taken(name):
        raise pod_name_in_use(name)
    plan = networking.plan(ctx, req.network, req.publish, req.dns)
    resolv = with_search(plan.resolv_conf, req.dns_search, req.dns_options)
    backend = resolve_backend(req.backend)
    check_pool(req.pool, backend)
    check_available(backend)
    host_share = req.host_share and backend == "qemu"  # Firecracker has no shared filesystem
    guest = locate()
    pod_id = new_vm_id()
    hostname = req.hostname or name
    ctx.pods.insert(PodRecord(id=pod_id, name=name, created=time.time(), status="created",
                              labels=json.dumps(req.labels)))
    pod_dir = ctx.root.pod(pod_id)
    try:
        network = networking.lease(ctx, plan, pod_id)
        cfg = PodConfig(
            pod_id=pod_id, name=name, backend=backend, kernel=str(guest.kernel), system=str(guest.system),
            vcpus=req.vcpus, memory_mib=req.memory_mib, hostname=hostname, cpu_limit=req.cpu_limit,
            boot_timeout=req.boot_timeout, pool=req.pool, labels=req.labels,
            hosts=hosts_file(hostname, network.ip or None), resolv_conf=resolv,
            vmm_confinement=req.vmm_confinement, network=network, host_share=host_share,
        )
        pod_dir.path.mkdir(mode=PRIVATE_DIR, parents=True)
        os.chmod(pod_dir.path, PRIVATE_DIR)
        if host_share:
            (pod_dir.path / SHARED_DIR).mkdir(mode=PRIVATE_DIR)
            podshare.mount_share(pod_dir.path / SHARED_DIR)
        cfg.dump(pod_dir.config)
    except BaseException:
        with contextlib.suppress(MicropodError):
            podshare.unmount_share(pod_dir.path / SHARED_DIR)
        shutil.rmtree(pod_dir.path, ignore_errors=True)
        networking.release_lease(ctx.root, pod_id)
        ctx.pods.delete(pod_id)
        raise
    return cfg


def set_network(ctx: Context, pod: PodRecord, network: NetworkSettings) -> PodConfig:
    """Give a pod that has not booted a network made for it elsewhere (a CNI attachment, by the CRI server)."""
    if pod.status != "created":
        raise ConflictError(f"pod {pod.name} has booted: its network is set")
    cfg = config(ctx, pod)
    cfg = replace(cfg, network=network, hosts=hosts_file(cfg.hostname, network.ip or None))
    cfg.dump(ctx.root.pod(pod.id).config)
    return cfg


def config(ctx: Context, pod: PodRecord) -> PodConfig:
    return PodConfig.load(ctx.root.pod(pod.id).config)


def members(ctx: Context, pod: PodRecord) -> list[VmRecord]:
    return [r for r in ctx.state.all() if r.pod == pod.id]


def start(ctx: Context, pod: PodRecord) -> None:
    """Boot the pod's VM, then start each of its containers, as podman's `pod start` does."""
    boot(ctx, pod)
    fresh = ctx.pods.get(pod.id)
    assert fresh is not None
    for record in members(ctx, fresh):
        if record.status not in ("running", "restarting"):
            ask(ctx, record, Op.ADD, until=Op.STARTED)


def boot(ctx: Context, pod: PodRecord) -> None:
    """The pod's VM up, if it is not already; its containers are left as they are."""
    if pod.status == "running" and pod.monitor is not None and pod.monitor.alive():
        return
    if pod.status == "starting":
        raise ConflictError(f"pod {pod.name} is being started by another command")
    cfg = config(ctx, pod)
    pod_dir = ctx.root.pod(pod.id)
    if cfg.host_share:
        podshare.mount_share(pod_dir.path / SHARED_DIR)  # gone with a reboot of the host
    if not ctx.pods.update_if(pod.id, ("created", "stopped", "dead"), status="starting", error=None,
                              monitor_pid=None, monitor_start=None, vmm_pid=None, vmm_start=None):
        raise ConflictError(f"pod {pod.name} is being started or removed by another command")
    args = ["--root", str(ctx.root.path), "--pod", pod.id, *(["--debug"] if ctx.debug else [])]
    from micropod.service.containers import spawn_monitor

    with os.fdopen(private_file(pod_dir.monitor_log), "ab") as log:
        pid = spawn_monitor(ctx, args, log.fileno())
    ref = ProcessRef.of(pid)
    if ref is not None:
        ctx.pods.update(pod.id, monitor_pid=ref.pid, monitor_start=ref.started)
    _await_running(ctx, pod, ref, cfg.boot_timeout + 60)


def _await_running(ctx: Context, pod: PodRecord, monitor: ProcessRef | None, timeout: float) -> None:
    """Until the pod's row says running; its error, and the monitor log's tail, if it ends instead."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while time.monotonic() < deadline:
        fresh = ctx.pods.get(pod.id)
        if fresh is None:
            raise NotFoundError(f"pod {pod.name} was removed while it started")
        if fresh.status == "running":
            return
        if fresh.status != "starting" or (monitor is not None and not monitor.alive()):
            raise ContainerCommandError(f"pod {pod.name} failed to start: {fresh.error or 'its monitor ended'}", 125)
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    raise TimeoutExpired(f"pod {pod.name} did not start within {timeout:.0f}s; see "
                         f"{ctx.root.pod(pod.id).monitor_log}")


def ask(ctx: Context, record: VmRecord, op: str, until: str, timeout: float = 120.0,
        **fields: Any) -> dict[str, Any]:
    """One request about a pod's container to the pod's monitor, and its answer (an ``until`` message, the
    container's exit, or the monitor's refusal as an exit with code 125)."""
    client = connect(ctx, record)
    try:
        client.request(op, **fields)
        return client.follow(until=until, timeout=timeout)
    finally:
        client.close()


def connect(ctx: Context, record: VmRecord) -> MonitorClient:
    pod = ctx.pods.get(record.pod)
    if pod is None or pod.status not in POD_ACTIVE:
        raise ConflictError(f"the pod of container {record.name} is not running")
    return MonitorClient.of(ctx.root, record)


def start_member(ctx: Context, record: VmRecord, attach: bool) -> MonitorClient:
    """Add a pod's container to its running VM (booting the pod first if it is down); the connection hears
    its start (STARTED, or an exit with the reason), then, with ``attach``, its output and exit."""
    pod = ctx.pods.get(record.pod)
    if pod is None:
        raise NotFoundError(f"the pod of container {record.name} no longer exists")
    boot(ctx, pod)
    ctx.state.update(record.id, status="created", exit_code=None, error=None, finished=None, started=None)
    client = MonitorClient.of(ctx.root, record)
    if attach:
        client.request(Op.ATTACH)
    client.request(Op.ADD)
    return client


def remove_member(ctx: Context, record: VmRecord) -> None:
    """Its disks off the pod's running VM; nothing to do when the pod is down."""
    pod = ctx.pods.get(record.pod)
    if pod is None or pod.status not in POD_ACTIVE:
        return
    with contextlib.suppress(NotFoundError):  # the monitor has just gone: so has the VM
        answer = ask(ctx, record, Op.REMOVE, until=Op.REMOVED, timeout=STOP_GRACE)
        if answer["op"] != Op.REMOVED:
            raise ContainerCommandError(str(answer.get("error") or "the pod refused to remove it"), 125)


def stop(ctx: Context, pod: PodRecord, timeout: float) -> None:
    """Every container's stop signal, SIGKILL after ``timeout``, then the VM powered off."""
    _ask_pod(ctx, pod, Op.POD_STOP, timeout + STOP_GRACE, timeout=timeout)


def kill(ctx: Context, pod: PodRecord) -> None:
    if pod.status not in POD_ACTIVE:
        raise ConflictError(f"pod {pod.name} is not running")
    _ask_pod(ctx, pod, Op.POD_KILL, STOP_GRACE)


def _ask_pod(ctx: Context, pod: PodRecord, op: str, wait: float, **fields: Any) -> None:
    if pod.status not in POD_ACTIVE:
        return
    try:
        client = MonitorClient.connect(ctx.root.pod(pod.id))
    except MicropodError:
        _reap(ctx, pod)
        return
    try:
        client.request(op, **fields)
        with contextlib.suppress(MicropodError):
            client.follow(timeout=wait)
    finally:
        client.close()
    _reap(ctx, pod)


def _reap(ctx: Context, pod: PodRecord) -> None:
    """After the monitor should have ended: whatever it left running is killed, and recorded."""
    fresh = ctx.pods.get(pod.id)
    if fresh is None or fresh.status not in POD_ACTIVE:
        return
    deadline = time.monotonic() + 5.0
    while fresh.monitor is not None and fresh.monitor.alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    for ref in (fresh.vmm, fresh.monitor):
        if ref is not None and ref.alive():
            ref.kill()
    ctx.pods.update_if(pod.id, POD_ACTIVE, status="stopped", finished=time.time(),
                       error="the pod's VM was killed after its monitor went away")
    for record in members(ctx, fresh):
        ctx.state.update_if(record.id, ("created", "running", "restarting"), status="exited", exit_code=137,
                            finished=time.time(), error="the pod's VM was killed")


def remove(ctx: Context, pod: PodRecord, force: bool) -> None:
    """The pod, its containers and everything they keep on the host; safe to repeat after a crash."""
    from micropod.monitor.hostcgroup import VmmCgroup
    from micropod.service import containers

    running = [r for r in members(ctx, pod) if containers.is_active(r)]
    if (pod.status in POD_ACTIVE or running) and not force:
        raise ConflictError(f"cannot remove pod {pod.name}: it is running; stop it first or use --force")
    if pod.status in POD_ACTIVE:
        kill(ctx, pod)
    for record in members(ctx, pod):
        containers.remove(ctx, record, force=True)
    networking.detach(ctx.root, pod.id)
    networking.release_lease(ctx.root, pod.id)
    VmmCgroup(pod.id, 1, 0).destroy()
    pod_dir = ctx.root.pod(pod.id).path
    podshare.unbind_all(pod_dir / SHARED_DIR)  # a host path still bound there would go with the directory
    podshare.unmount_share(pod_dir / SHARED_DIR)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(pod_dir)
    ctx.pods.delete(pod.id)
