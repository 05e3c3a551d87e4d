"""The sandbox half of RuntimeService: a pod sandbox is a micropod pod, one microVM booted by RunPodSandbox.

Only pods with a CRI record are listed: kubelet garbage-collects sandboxes it does not know, and must never
see (or remove) the pods a user made with the CLI. Those made here are ordinary pods to the CLI.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import grpc

from micropod.context import Context
from micropod.cri import records
from micropod.cri.api import pb
from micropod.cri.network import PodIdentity, PodNetworks
from micropod.cri.records import SandboxInfo
from micropod.cri.runtime_info import HandlerSettings
from micropod.cri.status import CriError, find_recorded, invalid, reserved
from micropod.names import check_name, check_pod_name
from micropod.service import pod_views, pods
from micropod.state.pods import PodRecord

STOP_TIMEOUT = 10.0
MIN_MEMORY_MIB = 256
PROTOCOLS = {pb.TCP: "tcp", pb.UDP: "udp"}


def micropod_name(reserved_name: str, kind: str) -> str:
    """micropod's name for a CRI sandbox or container: its reserved name, or a digest-suffixed cut of a long one."""
    check = check_pod_name if kind == "sandbox" else check_name
    if len(reserved_name) <= 128:
        return check(reserved_name)
    digest = hashlib.sha256(reserved_name.encode()).hexdigest()[:16]
    return check(f"{reserved_name[:111]}-{digest}")


def find(ctx: Context, ident: str) -> tuple[PodRecord, SandboxInfo]:
    return find_recorded("sandbox", ident, ctx.pods.find, lambda p: records.load_sandbox(ctx.root.pod(p.id).path))


def cri_pods(ctx: Context) -> list[tuple[PodRecord, SandboxInfo]]:
    found = []
    for pod in ctx.pods.reconcile():
        info = records.load_sandbox(ctx.root.pod(pod.id).path)
        if info is not None:
            found.append((pod, info))
    return found


def _publish(mappings: Any) -> tuple[tuple[str, ...], list[dict[str, Any]]]:
    published, recorded = [], []
    for mapping in mappings:
        if mapping.host_port <= 0:
            continue  # a container port with no host port: nothing to publish
        if mapping.protocol not in PROTOCOLS:
            raise invalid(f"port mapping {mapping.host_port}: micropod publishes TCP and UDP only")
        proto = PROTOCOLS[mapping.protocol]
        host = f"{mapping.host_ip}:" if mapping.host_ip else ""
        published.append(f"{host}{mapping.host_port}:{mapping.container_port}/{proto}")
        recorded.append({"protocol": proto, "host_ip": mapping.host_ip, "host_port": mapping.host_port,
                         "container_port": mapping.container_port})
    return tuple(published), recorded


def vm_size(linux: Any, handler: HandlerSettings) -> tuple[int, int]:
    """vCPUs and MiB for the VM: the pod's limits plus its overhead when kubelet gives them, else the handler's."""
    resources, overhead = linux.resources, linux.overhead
    vcpus, memory = handler.vcpus, handler.memory_mib
    if resources.cpu_quota > 0 and resources.cpu_period > 0:
        quota = resources.cpu_quota + max(overhead.cpu_quota, 0)
        vcpus = max(1, math.ceil(quota / resources.cpu_period))
    if resources.memory_limit_in_bytes > 0:
        total = resources.memory_limit_in_bytes + max(overhead.memory_limit_in_bytes, 0)
        memory = max(MIN_MEMORY_MIB, math.ceil(total / (1 << 20)))
    return vcpus, memory


def _sysctls(sysctls: Any) -> dict[str, str]:
    """The pod's sysctls: each container's, checked now (the network's are the VM's, shared by the pod)."""
    from micropod.service.admission import checked_sysctls

    return checked_sysctls(dict(sysctls), "sysctl")  # a UsageError: InvalidArgument


class Sandboxes:
    service = "RuntimeService"

    def __init__(self, handlers: dict[str, HandlerSettings], networks: PodNetworks, network: str | None = None) -> None:
        self.handlers = handlers
        self.networks = networks
        self.network = network  # micropod's own network mode, when there is no CNI configuration

    def RunPodSandbox(self, ctx: Context, request: pb.RunPodSandboxRequest) -> pb.RunPodSandboxResponse:
        config = request.config
        meta = config.metadata
        if not (meta.name and meta.uid and meta.namespace):
            raise invalid("the sandbox config must have metadata with a name, a uid and a namespace")
        handler = self.handlers.get(request.runtime_handler)
        if handler is None:
            raise CriError(grpc.StatusCode.UNKNOWN, f'failed to get sandbox runtime: no runtime for '
                           f'"{request.runtime_handler}" is configured')
        publish, mappings = _publish(config.port_mappings)
        info = SandboxInfo(name=meta.name, uid=meta.uid, namespace=meta.namespace, attempt=meta.attempt,
                           annotations=dict(config.annotations), log_directory=config.log_directory,
                           runtime_handler=request.runtime_handler, cgroup_parent=config.linux.cgroup_parent,
                           sysctls=_sysctls(config.linux.sysctls), port_mappings=mappings)
        name = micropod_name(info.reserved_name, "sandbox")
        if ctx.pods.name_taken(name):
            raise reserved("sandbox", info.reserved_name, ctx.pods.find(name).id)
        vcpus, memory = vm_size(config.linux, handler)
        dns = config.dns_config
        conf = self.networks.conf()
        cfg = pods.create(ctx, pods.PodRequest(
            name=name, publish=publish if conf is None else (), vcpus=vcpus, memory_mib=memory,
            hostname=config.hostname or meta.name, dns=tuple(dns.servers), dns_search=tuple(dns.searches),
            dns_options=tuple(dns.options), network=self.network if conf is None else "none",
            labels=dict(config.labels), backend=handler.vmm, host_share=handler.host_paths,
        ))
        try:
            records.save(ctx.root.pod(cfg.pod_id).path, info)
            pod = ctx.pods.get(cfg.pod_id)
            assert pod is not None
            if conf is not None:  # port mappings go through the portmap plugin
                identity = PodIdentity(cfg.pod_id, meta.name, meta.namespace, meta.uid)
                pods.set_network(ctx, pod, self.networks.setup(conf, identity, mappings))
            pods.boot(ctx, pod)
        except BaseException:
            made = ctx.pods.get(cfg.pod_id)
            if made is not None:
                pods.remove(ctx, made, force=True)
            self.networks.teardown_or_log(cfg.pod_id)  # the first error is the one to report
            raise
        return pb.RunPodSandboxResponse(pod_sandbox_id=cfg.pod_id)

    def StopPodSandbox(self, ctx: Context, request: pb.StopPodSandboxRequest) -> pb.StopPodSandboxResponse:
        pod, _ = find(ctx, request.pod_sandbox_id)
        pods.stop(ctx, pod, STOP_TIMEOUT)
        self.networks.teardown(pod.id)  # as containerd does: a stopped sandbox holds no address
        return pb.StopPodSandboxResponse()

    def RemovePodSandbox(self, ctx: Context,
                         request: pb.RemovePodSandboxRequest) -> pb.RemovePodSandboxResponse:
        try:
            pod, _ = find(ctx, request.pod_sandbox_id)
        except CriError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return pb.RemovePodSandboxResponse()  # containerd: removing what is gone succeeds
            raise
        pods.remove(ctx, pod, force=True)
        self.networks.teardown(pod.id)
        return pb.RemovePodSandboxResponse()

    def PodSandboxStatus(self, ctx: Context,
                         request: pb.PodSandboxStatusRequest) -> pb.PodSandboxStatusResponse:
        pod, info = find(ctx, request.pod_sandbox_id)
        cfg = pods.config(ctx, pod)
        status = pb.PodSandboxStatus(
            id=pod.id, metadata=_metadata(info), state=_state(pod), created_at=_ns(pod.created),
            network=pb.PodSandboxNetworkStatus(ip=cfg.network.ip or ""),
            linux=pb.LinuxPodSandboxStatus(namespaces=pb.Namespace(options=pb.NamespaceOption(
                network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD))),
            labels=pod.label_map, annotations=info.annotations, runtime_handler=info.runtime_handler,
        )
        verbose = {}
        if request.verbose:
            detail = pod_views.inspect(ctx, pod)
            detail["cri"] = {"reservedName": info.reserved_name, "logDirectory": info.log_directory,
                             "cgroupParent": info.cgroup_parent, "sysctls": info.sysctls,
                             "portMappings": info.port_mappings, "network": cfg.network.mode,
                             "netns": cfg.network.netns}
            verbose["info"] = json.dumps(detail)
        return pb.PodSandboxStatusResponse(status=status, info=verbose)

    def ListPodSandbox(self, ctx: Context, request: pb.ListPodSandboxRequest) -> pb.ListPodSandboxResponse:
        wanted = request.filter
        items = []
        self.networks.sweep(lambda: {p.id for p in ctx.pods.reconcile()})  # kubelet lists every second or so
        for pod, info in cri_pods(ctx):
            if wanted.id and not pod.id.startswith(wanted.id):
                continue
            if wanted.HasField("state") and _state(pod) != wanted.state.state:
                continue
            labels = pod.label_map
            if any(labels.get(k) != v for k, v in wanted.label_selector.items()):
                continue
            items.append(pb.PodSandbox(id=pod.id, metadata=_metadata(info), state=_state(pod),
                                       created_at=_ns(pod.created), labels=labels, annotations=info.annotations,
                                       runtime_handler=info.runtime_handler))
        return pb.ListPodSandboxResponse(items=items)


def _metadata(info: SandboxInfo) -> pb.PodSandboxMetadata:
    return pb.PodSandboxMetadata(name=info.name, uid=info.uid, namespace=info.namespace, attempt=info.attempt)


def _state(pod: PodRecord) -> pb.PodSandboxState:
    return pb.SANDBOX_READY if pod.status == "running" else pb.SANDBOX_NOTREADY


def _ns(seconds: float | None) -> int:
    return int(seconds * 1e9) if seconds else 0
