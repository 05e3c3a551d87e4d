"""Container lifecycle operations, independent of the CLI (the CRI server will reuse them).

A container is one VM: create records it and writes its RunConfig, start spawns its monitor.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from micropod import proc
from micropod.context import Context
from micropod.errors import ConflictError, MicropodError, NotFoundError, UsageError
from micropod.fsutil import PRIVATE_DIR, private_file
from micropod.liveness import ProcessRef
from micropod.monitor.api import Op
from micropod.monitor.client import MonitorClient, Outcome, outcome
from micropod.names import check_name, generated_name, new_vm_id
from micropod.net import lifecycle as networking
from micropod.net.dns import hosts_file
from micropod.podconfig import SHARED_DIR
from micropod.quotas import Quotas
from micropod.rootfs.upper import DEFAULT_UPPER_SIZE
from micropod.runconfig import (
    BindMount,
    ContainerSpec,
    DeviceMapping,
    LogOptions,
    RestartPolicy,
    RunConfig,
    SecurityOptions,
    TmpfsMount,
    VolumeMount,
    merge_command,
    merge_env,
    parse_signal,
)
from micropod.service import podshare
from micropod.service.admission import checked_quotas, checked_sysctls, pod_of, resolved_binds
from micropod.state import ACTIVE, VmRecord, name_in_use
from micropod.volumes import VolumeRequest

STOP_GRACE = 30.0


@dataclass
class RunRequest:
    image: str
    args: tuple[str, ...] = ()
    name: str | None = None
    auto_remove: bool = False
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    entrypoint: str | None = None
    hostname: str | None = None
    vcpus: int = 1
    cpu_limit: float = 0.0
    memory_mib: int = 256
    backend: str = "auto"
    boot_timeout: float = 60.0
    stdin: bool = False
    tty: bool = False
    log: LogOptions = field(default_factory=LogOptions)
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    network: str | None = None  # "bridge" or "none"; None: MICROPOD_NETWORK, else bridge
    publish: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    security: SecurityOptions = field(default_factory=SecurityOptions)
    volumes: tuple[VolumeRequest, ...] = ()
    tmpfs: tuple[TmpfsMount, ...] = ()
    read_only: bool = False
    binds: tuple[BindMount, ...] = ()
    devices: tuple[DeviceMapping, ...] = ()  # of the VM's own kernel, checked (micropod/agent/devices.py)
    pids_limit: int = 0
    upper_size: int | None = None  # --storage-opt size=; None: the default
    pod: str | None = None  # --pod: a container of that pod's VM, whose own --memory/--cpus become cgroup limits
    memory_limit: int = 0
    cpu_quota: float = 0.0
    cpuset_mems: str = ""  # a pod's container's cgroup's memory nodes (the CRI's); "": any
    sysctls: dict[str, str] = field(default_factory=dict)
    quotas: Quotas = field(default_factory=Quotas)
    user_data: dict[str, Any] = field(default_factory=dict)  # for the metadata service
    labels: dict[str, str] = field(default_factory=dict)


def create(ctx: Context, req: RunRequest, configured_only: bool = False) -> RunConfig:
    """Resolve everything a VM needs, record it, and write its config. Nothing is left on failure. With
    ``configured_only`` (docker's `create`) the record waits, as "configured", for a `start`."""
    from micropod.guest.artefacts import locate
    from micropod.rootfs.squash import ensure_rootfs
    from micropod.vmm.factory import check_available, resolve_backend

    name = check_name(req.name) if req.name else generated_name()
    if ctx.state.name_taken(name):  # fail before pulling or building anything; insert() catches a race
        raise name_in_use(name)
    pod = pod_of(ctx, req)
    plan = networking.plan(ctx, "none" if pod else req.network, req.publish, () if pod else req.dns)
    quotas = checked_quotas(req, plan.network is not None)
    sysctls = checked_sysctls(req.sysctls)
    if req.user_data and (pod or plan.network is None):
        raise UsageError("--metadata needs the VM's metadata service, which a pod's container and a --network none "
                         "VM do not have")
    try:
        image = ctx.images.resolve(req.image)
    except NotFoundError:
        from micropod.image.pull import pull_missing

        image = pull_missing(ctx, req.image)  # like docker: an image not in the store is pulled first
    config = image.config
    command = merge_command(config.entrypoint, config.cmd, req.entrypoint, req.args)
    backend = pod.backend if pod else resolve_backend(req.backend)
    check_available(backend)
    if backend in ("qemu", "firecracker") and req.security.vmm_confinement:
        from micropod.vmm.vmm_ids import id_range

        id_range()  # a malformed MICROPOD_VMM_IDS is refused before anything is recorded
    binds = resolved_binds(req.binds, backend, files=pod is not None)
    guest = locate()
    vm_id = new_vm_id()
    hostname = req.hostname or (pod.hostname if pod else vm_id[:12])
    rootfs = ensure_rootfs(ctx.root, ctx.images, image)
    ctx.state.insert(VmRecord(
        id=vm_id, name=name, image=req.image, image_id=image.id, command=json.dumps(list(command)),
        created=time.time(), status="configured" if configured_only else "created",
        auto_remove=int(req.auto_remove), backend=backend, pod=pod.pod_id if pod else "",
    ))
    vm_dir = ctx.root.vm(vm_id)
    share = ctx.root.pod(pod.pod_id).path / SHARED_DIR if pod else None
    try:
        if share is not None and binds:
            binds = tuple(replace(b, shared=podshare.entry_name(vm_id, i)) for i, b in enumerate(binds))
            for bind in binds:
                podshare.bind(share, bind.shared, Path(bind.source), bind.read_only)
        network = networking.lease(ctx, plan, vm_id)
        volumes = _use_volumes(ctx, vm_id, req.volumes)
        spec = ContainerSpec(
            args=command,
            env=merge_env(config.env, req.env, hostname),
            cwd=req.workdir or config.working_dir or "/",
            user=req.user if req.user is not None else config.user,
            hostname=hostname,
            stdin=req.stdin,
            tty=req.tty,
            hosts=pod.hosts if pod else hosts_file(hostname, network.ip or None),
            resolv_conf=pod.resolv_conf if pod else plan.resolv_conf,
            security=req.security,
            volumes=volumes,
            tmpfs=req.tmpfs,
            read_only=req.read_only,
            binds=binds,
            devices=req.devices,
            pids_limit=req.pids_limit,
            memory_limit=req.memory_limit,
            cpu_quota=req.cpu_quota,
            cpu_shares=req.quotas.cpu_shares if pod else 0,
            cpuset_cpus=req.quotas.cpuset_cpus if pod else "",
            cpuset_mems=req.cpuset_mems,
            sysctls=sysctls,
        )
        cfg = RunConfig(
            vm_id=vm_id, name=name, image=req.image, image_id=image.id, backend=backend,
            kernel=str(guest.kernel), system=str(guest.system), rootfs=str(rootfs),
            vcpus=req.vcpus, memory_mib=req.memory_mib, container=spec, auto_remove=req.auto_remove,
            stop_signal=parse_signal(config.stop_signal), boot_timeout=req.boot_timeout, log=req.log,
            restart=req.restart, network=network, upper_size=req.upper_size or DEFAULT_UPPER_SIZE,
            cpu_limit=req.cpu_limit, quotas=quotas, user_data=req.user_data, labels=req.labels,
        )
        vm_dir.path.mkdir(mode=PRIVATE_DIR, parents=True)
        os.chmod(vm_dir.path, PRIVATE_DIR)
        cfg.dump(vm_dir.config)
    except BaseException:
        if share is not None:
            podshare.unbind_container(share, vm_id, len(binds))
        shutil.rmtree(vm_dir.path, ignore_errors=True)
        networking.release_lease(ctx.root, vm_id)
        if req.volumes:
            ctx.volumes.release_all(vm_id)
        ctx.state.delete(vm_id)
        raise
    return cfg


def _remove_vmm_cgroup(vm_id: str) -> None:
    """A monitor that was killed could not remove its VMM's host cgroup: rm does (it is empty by now)."""
    from micropod.monitor.hostcgroup import VmmCgroup

    VmmCgroup(vm_id, 1, 0).destroy()


def _use_volumes(ctx: Context, vm_id: str, wanted: tuple[VolumeRequest, ...]) -> tuple[VolumeMount, ...]:
    """Each named volume, made if it does not exist yet (as docker does), recorded as this container's."""
    mounts = []
    for request in wanted:
        ctx.volumes.create(request.name)
        volume = ctx.volumes.use(request.name, vm_id)
        mounts.append(VolumeMount(volume.name, request.target, str(volume.path), request.read_only))
    return tuple(mounts)


def start(ctx: Context, cfg: RunConfig, attach: bool, maintenance: bool = False) -> MonitorClient | None:
    """Spawn the VM's monitor, detached; with ``attach`` the caller gets the output stream. A pod's container is
    added to its pod's VM instead."""
    record = ctx.state.get(cfg.vm_id)
    if record is not None and record.pod:
        if maintenance:
            raise UsageError(f"container {record.name} is in a pod: its pod's VM mounts it for a copy")
        from micropod.service import pods

        return pods.start_member(ctx, record, attach)
    vm_dir = ctx.root.vm(cfg.vm_id)
    ours: socket.socket | None = None
    theirs: socket.socket | None = None
    args = ["--root", str(ctx.root.path), cfg.vm_id]
    if ctx.debug:
        args.append("--debug")
    if maintenance:
        args.append("--maintenance")
    if attach:
        ours, theirs = socket.socketpair()
    try:
        with os.fdopen(private_file(vm_dir.monitor_log), "ab") as log:
            pid = spawn_monitor(ctx, args, log.fileno(), theirs.fileno() if theirs else None)
    except BaseException:
        if ours:
            ours.close()
        raise
    finally:
        if theirs:
            theirs.close()
    ref = ProcessRef.of(pid)
    if ref is not None:
        ctx.state.update(cfg.vm_id, monitor_pid=ref.pid, monitor_start=ref.started)
    return MonitorClient(ours) if ours else None


def spawn_monitor(ctx: Context, args: list[str], log_fd: int, attach_fd: int | None = None) -> int:
    """Start a monitor (``python -m micropod.monitor ARGS``, detached, its output into ``log_fd``): forked from
    the state root's pre-imported forker (micropod/monitor/forker.py), or spawned when that cannot be."""
    from micropod.monitor.forker import ATTACH_FD, fork_monitor

    attach = ["--attach-fd", ATTACH_FD] if attach_fd is not None else []
    pid = fork_monitor(ctx.root, [*attach, *args], proc.minimal_env(monitor_env()), log_fd, attach_fd)
    if pid is not None:
        return pid
    # -P and "/": no module is ever imported from the caller's working directory
    argv: list[str | Path] = [sys.executable, "-P", "-m", "micropod.monitor",
                              *(["--attach-fd", str(attach_fd)] if attach_fd is not None else []), *args]
    return proc.spawn(argv, stdout=log_fd, stderr=log_fd, new_session=True, cwd=Path("/"),
                      pass_fds=[attach_fd] if attach_fd is not None else [], env=monitor_env()).pid


def monitor_env() -> dict[str, str]:
    """micropod's own settings follow the monitor; proc.spawn's minimal environment drops the rest."""
    return {k: v for k, v in os.environ.items() if k.startswith("MICROPOD_") or k == "PYTHONPATH"}


def is_active(record: VmRecord) -> bool:
    return record.status in ACTIVE


def stop(ctx: Context, record: VmRecord, timeout: float, signal_name: str | None = None) -> Outcome | None:
    """SIGTERM (or the stop signal) to the container, the VM killed after ``timeout`` seconds."""
    if not is_active(record):
        return None
    fields: dict[str, object] = {"timeout": timeout}
    if signal_name:
        fields["signal"] = parse_signal(signal_name)
    return _ask_monitor(ctx, record, Op.STOP, fields, timeout + STOP_GRACE)


def kill(ctx: Context, record: VmRecord, signal_name: str | None = None) -> None:
    if not is_active(record):
        raise ConflictError(f"container {record.name} is not running")
    if signal_name is None or parse_signal(signal_name) == 9:
        _ask_monitor(ctx, record, Op.KILL, {}, STOP_GRACE)
    else:
        _ask_monitor(ctx, record, Op.SIGNAL, {"signal": parse_signal(signal_name)}, None)


def _ask_monitor(
    ctx: Context, record: VmRecord, op: str, fields: dict[str, object], wait: float | None
) -> Outcome | None:
    try:
        client = MonitorClient.of(ctx.root, record)
    except MicropodError:
        _reap_unmonitored(ctx, record)
        return None
    try:
        client.request(op, **fields)
        if wait is None:
            return None
        try:
            return outcome(client.follow(timeout=wait))
        except MicropodError:
            _reap_unmonitored(ctx, record)
            return None
    finally:
        client.close()


def _reap_unmonitored(ctx: Context, record: VmRecord) -> None:
    """The monitor is gone: end whatever is left of the VM ourselves and record it."""
    fresh = ctx.state.get(record.id)
    if fresh is None or not is_active(fresh):
        return
    vmm = fresh.vmm
    if vmm is not None and not fresh.pod:  # a pod's container shares its VM: only the pod's end kills it
        vmm.kill()
    monitor = fresh.monitor
    if monitor is not None and monitor.alive():
        return  # it is still there, only slow: it records the exit itself
    ctx.state.update_if(record.id, ACTIVE, status="exited", exit_code=137, finished=time.time(),
                        error="the VM was killed after its monitor went away")


def remove(ctx: Context, record: VmRecord, force: bool) -> None:
    """Remove a container and everything it has on the host; safe to repeat after a crash."""
    if is_active(record):
        if not force:
            raise ConflictError(
                f"cannot remove container {record.name}: it is {record.status}; "
                "stop it first or use --force"
            )
        kill_and_wait(ctx, record)
    if record.pod:
        from micropod.service import pods

        pods.remove_member(ctx, record)
        bound = RunConfig.load_if_present(ctx.root.vm(record.id).config)
        podshare.unbind_container(ctx.root.pod(record.pod).path / podshare.SHARED_DIR, record.id,
                                  len(bound.container.binds) if bound else 0)
    vm_dir = ctx.root.vm(record.id)
    networking.detach(ctx.root, record.id)
    networking.release_lease(ctx.root, record.id)
    ctx.volumes.release_all(record.id)
    _remove_vmm_cgroup(record.id)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(vm_dir.path)
    ctx.state.delete(record.id)


def wait_started(client: MonitorClient, timeout: float) -> dict[str, Any] | None:
    """Until the monitor says the container has started (None), or its exit message if it ended first; the
    client is closed either way."""
    try:
        return await_start(client, timeout)
    finally:
        client.close()


def await_start(client: MonitorClient, timeout: float) -> dict[str, Any] | None:
    """wait_started, with the client left open for what follows the start."""
    message = client.follow(until=Op.STARTED, timeout=timeout)
    return message if message["op"] == Op.EXIT else None


def discard(ctx: Context, vm_id: str) -> None:
    """A container that never ran goes, with all it has on the host."""
    record = ctx.state.get(vm_id)
    if record is not None:
        with contextlib.suppress(MicropodError):
            remove(ctx, record, force=True)


def kill_and_wait(ctx: Context, record: VmRecord) -> None:
    _ask_monitor(ctx, record, Op.KILL, {}, STOP_GRACE)
    if record.pod:
        return  # its monitor is the pod's, which goes on
    monitor = record.monitor
    deadline = time.monotonic() + STOP_GRACE
    while monitor is not None and monitor.alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if monitor is not None and monitor.alive():
        monitor.kill()
    _reap_unmonitored(ctx, record)



def start_existing(ctx: Context, record: VmRecord) -> MonitorClient:
    """Boot a stopped container's VM again, with its writable layer (upper.ext4) kept."""
    if is_active(record):
        raise ConflictError(f"container {record.name} is already running")
    cfg = RunConfig.load(ctx.root.vm(record.id).config)
    changed = ctx.state.update_if(record.id, ("exited", "dead", "configured"), status="created", exit_code=None,
                                  error=None, finished=None, started=None, restart_count=0, vmm_pid=None,
                                  vmm_start=None)
    if not changed:
        raise ConflictError(f"container {record.name} is being started or removed by another command")
    if record.pod:
        from micropod.service import pods

        return pods.start_member(ctx, record, attach=True)
    client = start(ctx, cfg, attach=True)
    assert client is not None
    return client
