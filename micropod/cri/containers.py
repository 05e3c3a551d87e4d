"""The container half of RuntimeService: a CRI container is a micropod container of its sandbox's pod.

CreateContainer records it ("configured", as docker's `create`), StartContainer adds it to the running VM.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import grpc

from micropod.context import Context
from micropod.cri import records
from micropod.cri.api import pb
from micropod.cri.images import image_message
from micropod.cri.records import ContainerInfo, SandboxInfo
from micropod.cri.sandboxes import find as find_sandbox
from micropod.cri.sandboxes import micropod_name
from micropod.cri.status import CriError, find_recorded, invalid, reserved
from micropod.errors import ConflictError, MicropodError, NotFoundError, UsageError
from micropod.monitor.api import Op
from micropod.quotas import Quotas
from micropod.runconfig import DEFAULT_LOG, BindMount, ContainerSpec, DeviceMapping, RunConfig
from micropod.securityopts import capability, profile
from micropod.service import containers, execs, pods
from micropod.service.containers import RunRequest
from micropod.service.update import UpdateRequest, update
from micropod.state import VmRecord
from micropod.wire import CPU_PERIOD

STATES = {"configured": pb.CONTAINER_CREATED, "created": pb.CONTAINER_CREATED, "running": pb.CONTAINER_RUNNING,
          "restarting": pb.CONTAINER_RUNNING, "exited": pb.CONTAINER_EXITED, "dead": pb.CONTAINER_EXITED}
START_TIMEOUT = 120.0


def find(ctx: Context, ident: str) -> tuple[VmRecord, ContainerInfo]:
    return find_recorded("container", ident, ctx.state.find, lambda r: records.load_container(ctx.root.vm(r.id).path))


def command_of(image_entrypoint: tuple[str, ...], image_cmd: tuple[str, ...], command: list[str],
               args: list[str]) -> tuple[str, ...]:
    """Kubernetes' rule: command replaces the image's entrypoint (and drops its cmd), args replace its cmd."""
    if command:
        return (*command, *args)
    return (*image_entrypoint, *(args or image_cmd))


def user_of(context: Any) -> str | None:
    if context.run_as_username:
        return str(context.run_as_username)
    if context.HasField("run_as_user"):
        group = f":{context.run_as_group.value}" if context.HasField("run_as_group") else ""
        return f"{context.run_as_user.value}{group}"
    if context.HasField("run_as_group"):
        raise invalid("run_as_group needs run_as_user or run_as_username")
    return None


def security_of(context: Any) -> Any:
    from micropod.runconfig import SecurityOptions

    seccomp = "unconfined"  # kubelet asks for RuntimeDefault when the pod wants it, as containerd expects
    if context.HasField("seccomp"):
        kind = context.seccomp.profile_type
        if kind == pb.SecurityProfile.RuntimeDefault:
            seccomp = "default"
        elif kind == pb.SecurityProfile.Localhost:
            ref = context.seccomp.localhost_ref
            if not os.path.isabs(ref):
                raise invalid(f"seccomp profile {ref!r}: a Localhost profile is an absolute path on the host")
            seccomp = profile(Path(ref))
    caps = context.capabilities
    return SecurityOptions(privileged=context.privileged, cap_add=tuple(capability(c) for c in caps.add_capabilities),
                           cap_drop=tuple(capability(c) for c in caps.drop_capabilities), seccomp=seccomp,
                           no_new_privileges=context.no_new_privs)


def check_namespaces(options: Any) -> None:
    if options.network == pb.NODE:
        raise invalid("host networking is not available: a sandbox is a VM with its own network")
    if options.pid in (pb.POD, pb.NODE, pb.TARGET):
        raise invalid("each container of a micropod sandbox has its own PID namespace: pid must be CONTAINER")


def limits_of(container_id: str, resources: Any) -> UpdateRequest:
    """LinuxContainerResources as the container's cgroup limits in its pod's VM (0: none; a cpuset given as ""
    is left as it is, as containerd leaves it). Hugepage
    limits bound what the guest has none of; ``unified`` is refused, since its keys would bypass the checks."""
    if resources.unified:
        raise invalid(f"container {container_id}: unified cgroup settings are not supported")
    period, quota = resources.cpu_period or CPU_PERIOD, resources.cpu_quota
    shares = min(max(resources.cpu_shares, 2), 262144) if resources.cpu_shares > 0 else 0
    return UpdateRequest(memory_limit=max(resources.memory_limit_in_bytes, 0),
                         cpu_quota=quota / period if quota > 0 and period > 0 else 0.0, cpu_shares=shares,
                         cpuset_cpus=resources.cpuset_cpus or None, cpuset_mems=resources.cpuset_mems or None)


def resources_message(spec: ContainerSpec) -> Any:
    """What ContainerStatus reports of the limits that hold (kubelet compares them with the pod's)."""
    return pb.ContainerResources(linux=pb.LinuxContainerResources(
        cpu_period=CPU_PERIOD if spec.cpu_quota else 0, cpu_quota=int(spec.cpu_quota * CPU_PERIOD),
        cpu_shares=spec.cpu_shares, memory_limit_in_bytes=spec.memory_limit, cpuset_cpus=spec.cpuset_cpus,
        cpuset_mems=spec.cpuset_mems))


def log_path(sandbox: SandboxInfo, path: str) -> str:
    if not path:
        return ""
    if os.path.isabs(path) or not sandbox.log_directory:
        return path if os.path.isabs(path) else ""
    return os.path.join(sandbox.log_directory, path)


def devices_of(devices: Any) -> tuple[DeviceMapping, ...]:
    """A CRI container's devices: ones of the VM's own kernel (micropod/agent/devices.py)."""
    try:
        return tuple(DeviceMapping.requested(d.host_path, d.container_path, d.permissions) for d in devices)
    except UsageError as exc:
        raise invalid(exc.message) from None


def binds_of(mounts: Any) -> tuple[BindMount, ...]:
    """Host path mounts, bound into the sandbox's shared directory; image volumes and bidirectional
    propagation (a guest's mounts reaching the host) are refused."""
    binds = []
    for mount in mounts:
        where = f"mount {mount.host_path or mount.image.image!r} on {mount.container_path!r}"
        if not mount.host_path:
            raise invalid(f"{where}: only host path mounts are supported")
        if not (mount.host_path.startswith("/") and mount.container_path.startswith("/")):
            raise invalid(f"{where}: the host and container paths must be absolute")
        if mount.propagation == pb.PROPAGATION_BIDIRECTIONAL:
            raise invalid(f"{where}: bidirectional propagation would let the guest mount on the host")
        binds.append(BindMount(mount.host_path, mount.container_path, mount.readonly))
    return tuple(binds)


class Containers:
    service = "RuntimeService"

    def CreateContainer(self, ctx: Context, request: pb.CreateContainerRequest) -> pb.CreateContainerResponse:
        pod, sandbox = find_sandbox(ctx, request.pod_sandbox_id)
        config = request.config
        if not config.metadata.name:
            raise invalid("the container config must have metadata with a name")
        if pod.status != "running":
            raise CriError(grpc.StatusCode.FAILED_PRECONDITION,
                           f'failed to create container: sandbox "{pod.id}" is not running')
        info = ContainerInfo(name=config.metadata.name, attempt=config.metadata.attempt, sandbox_id=pod.id,
                             image=config.image.image, annotations=dict(config.annotations),
                             log_path=log_path(sandbox, config.log_path))
        name = micropod_name(info.reserved_name(sandbox), "container")
        if ctx.state.name_taken(name):
            raise reserved("container", info.reserved_name(sandbox), ctx.state.find(name).id)
        devices = devices_of(config.devices)
        binds = binds_of(config.mounts)
        try:
            image = ctx.images.resolve(config.image.image)
        except NotFoundError:
            raise CriError(grpc.StatusCode.NOT_FOUND,
                           f'failed to resolve image "{config.image.image}": not found') from None
        linux = config.linux
        if linux.security_context.HasField("namespace_options"):  # absent: every field would read as POD
            check_namespaces(linux.security_context.namespace_options)
        limits = limits_of(name, linux.resources)
        argv = command_of(image.config.entrypoint, image.config.cmd, list(config.command), list(config.args))
        env = [f"{kv.key}={kv.value.decode(errors='surrogateescape')}" for kv in config.envs]
        cfg = containers.create(ctx, RunRequest(
            image=config.image.image, args=argv, entrypoint="", name=name, env=env,
            workdir=config.working_dir or None, user=user_of(linux.security_context), stdin=config.stdin,
            tty=config.tty, pod=pod.id, memory_limit=limits.memory_limit or 0, cpu_quota=limits.cpu_quota or 0.0,
            quotas=Quotas(cpu_shares=limits.cpu_shares or 0, cpuset_cpus=limits.cpuset_cpus or ""),
            cpuset_mems=limits.cpuset_mems or "", sysctls=sandbox.sysctls,
            read_only=linux.security_context.readonly_rootfs, security=security_of(linux.security_context),
            labels=dict(config.labels), log=replace(DEFAULT_LOG, cri_path=info.log_path), binds=binds,
            devices=devices,
        ), configured_only=True)
        try:
            records.save(ctx.root.vm(cfg.vm_id).path, info)
        except BaseException:
            containers.discard(ctx, cfg.vm_id)
            raise
        return pb.CreateContainerResponse(container_id=cfg.vm_id)

    def StartContainer(self, ctx: Context, request: pb.StartContainerRequest) -> pb.StartContainerResponse:
        record, _ = find(ctx, request.container_id)
        if record.status != "configured":
            raise CriError(grpc.StatusCode.UNKNOWN, f'container "{record.id}" is in '
                           f'{pb.ContainerState.Name(STATES[record.status])} state, not CONTAINER_CREATED')
        if not ctx.state.update_if(record.id, ("configured",), status="created"):
            raise ConflictError(f"container {record.id} is being started or removed by another call")
        client = pods.start_member(ctx, record, attach=False)
        ended = containers.wait_started(client, START_TIMEOUT)
        if ended is not None:
            raise CriError(grpc.StatusCode.UNKNOWN, f"failed to start container {record.id}: "
                           f"{ended.get('error') or 'it exited with code ' + str(ended.get('code'))}")
        return pb.StartContainerResponse()

    def StopContainer(self, ctx: Context, request: pb.StopContainerRequest) -> pb.StopContainerResponse:
        record, _ = find(ctx, request.container_id)
        containers.stop(ctx, record, float(max(request.timeout, 0)))
        return pb.StopContainerResponse()

    def RemoveContainer(self, ctx: Context, request: pb.RemoveContainerRequest) -> pb.RemoveContainerResponse:
        try:
            record, _ = find(ctx, request.container_id)
        except CriError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return pb.RemoveContainerResponse()
            raise
        containers.remove(ctx, record, force=True)
        return pb.RemoveContainerResponse()

    def ContainerStatus(self, ctx: Context, request: pb.ContainerStatusRequest) -> pb.ContainerStatusResponse:
        record, info = find(ctx, request.container_id)
        cfg = RunConfig.load(ctx.root.vm(record.id).config)
        state = STATES.get(record.status, pb.CONTAINER_UNKNOWN)
        reason, message = "", record.error or ""
        if state == pb.CONTAINER_EXITED:
            reason = "Completed" if record.exit_code == 0 else "Error"
            if record.exit_code == 137 and record.error and "memory" in record.error.lower():
                reason = "OOMKilled"
        status = pb.ContainerStatus(
            id=record.id, metadata=pb.ContainerMetadata(name=info.name, attempt=info.attempt), state=state,
            created_at=_ns(record.created), started_at=_ns(record.started), finished_at=_ns(record.finished),
            exit_code=record.exit_code or 0, image=pb.ImageSpec(image=info.image), image_ref=_image_ref(ctx, record),
            reason=reason, message=message, labels=cfg.labels, annotations=info.annotations, log_path=info.log_path,
            image_id=f"sha256:{record.image_id}", resources=resources_message(cfg.container),
        )
        verbose = {"info": json.dumps({"pid": 0, "sandboxID": info.sandbox_id, "config": asdict(cfg)})} \
            if request.verbose else {}
        return pb.ContainerStatusResponse(status=status, info=verbose)

    def ListContainers(self, ctx: Context, request: pb.ListContainersRequest) -> pb.ListContainersResponse:
        wanted = request.filter
        found = []
        for record in containers_reconciled(ctx):
            info = records.load_container(ctx.root.vm(record.id).path)
            if info is None or (wanted.id and not record.id.startswith(wanted.id)):
                continue
            if wanted.pod_sandbox_id and not info.sandbox_id.startswith(wanted.pod_sandbox_id):
                continue
            state = STATES.get(record.status, pb.CONTAINER_UNKNOWN)
            if wanted.HasField("state") and state != wanted.state.state:
                continue
            labels = RunConfig.load(ctx.root.vm(record.id).config).labels
            if any(labels.get(k) != v for k, v in wanted.label_selector.items()):
                continue
            found.append(pb.Container(
                id=record.id, pod_sandbox_id=info.sandbox_id,
                metadata=pb.ContainerMetadata(name=info.name, attempt=info.attempt),
                image=pb.ImageSpec(image=info.image), image_ref=_image_ref(ctx, record), state=state,
                created_at=_ns(record.created), labels=labels, annotations=info.annotations,
                image_id=f"sha256:{record.image_id}"))
        return pb.ListContainersResponse(containers=found)

    def UpdateContainerResources(self, ctx: Context, request: pb.UpdateContainerResourcesRequest
                                 ) -> pb.UpdateContainerResourcesResponse:
        """As containerd: the new limits are kept for the container's next start and, while it runs, applied
        to its cgroup at once; refused whole if the guest refuses them."""
        record, _ = find(ctx, request.container_id)
        if request.HasField("linux"):
            update(ctx, record, limits_of(record.id, request.linux))
        return pb.UpdateContainerResourcesResponse()

    def ExecSync(self, ctx: Context, request: pb.ExecSyncRequest) -> pb.ExecSyncResponse:
        record, _ = find(ctx, request.container_id)
        if not request.cmd:
            raise invalid("ExecSync needs a command")
        result = execs.exec_sync(ctx, record, list(request.cmd), float(request.timeout) if request.timeout else None)
        return pb.ExecSyncResponse(stdout=result.stdout, stderr=result.stderr, exit_code=result.code)

    def ReopenContainerLog(self, ctx: Context,
                           request: pb.ReopenContainerLogRequest) -> pb.ReopenContainerLogResponse:
        record, info = find(ctx, request.container_id)
        if record.status != "running":
            raise CriError(grpc.StatusCode.UNKNOWN, f"container {record.id} is not running")
        if not info.log_path:
            raise invalid(f"container {record.id} has no log path")
        answer = pods.ask(ctx, record, Op.REOPEN_LOG, until=Op.LOG_REOPENED, timeout=10.0)
        if answer["op"] != Op.LOG_REOPENED:
            raise CriError(grpc.StatusCode.UNKNOWN, str(answer.get("error") or "the log was not reopened"))
        return pb.ReopenContainerLogResponse()


def containers_reconciled(ctx: Context) -> list[VmRecord]:
    from micropod.service.reconcile import reconcile

    with contextlib.suppress(MicropodError):
        return reconcile(ctx)
    return ctx.state.all()


def _image_ref(ctx: Context, record: VmRecord) -> str:
    """As containerd: the image's first repo digest, else its id (what kubelet shows as imageID)."""
    with contextlib.suppress(MicropodError):
        image = image_message(ctx.images.resolve(record.image))
        return image.repo_digests[0] if image.repo_digests else image.id
    return f"sha256:{record.image_id}"


def _ns(seconds: float | None) -> int:
    return int(seconds * 1e9) if seconds else 0
