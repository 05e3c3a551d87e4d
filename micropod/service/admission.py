"""What a new container may ask for, checked before anything is recorded: its pod's rules, its quotas' disks,
and its bind mounts' host directories."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from micropod.context import Context
from micropod.errors import UsageError
from micropod.podconfig import PodConfig
from micropod.quotas import Quotas
from micropod.runconfig import BindMount

if TYPE_CHECKING:
    from micropod.service.containers import RunRequest


def checked_quotas(req: RunRequest, networked: bool) -> Quotas:
    """Each disk rate names the writable layer or one of the container's volumes; a pod's containers have only
    their cgroup limits (the pod's VM is shared)."""
    quotas = req.quotas
    if req.pod is not None:
        if replace(quotas, cpu_shares=0, cpuset_cpus="") != Quotas():
            raise UsageError("a pod's container takes --memory, --cpus, --cpu-shares, --cpuset-cpus and --pids-limit "
                             "as its own cgroup's limits; the VM's quotas (memory reservation, disk and network "
                             "rates) are not available for it")
        return Quotas()  # its CPU shares and cpuset are its cgroup's, in its spec
    if req.cpuset_mems:
        raise UsageError("cpuset_mems is a pod's container's cgroup limit; a VM of its own has one memory node")
    targets = {"", "/"} | {v.target for v in req.volumes}
    for rate in quotas.disk_rates:
        if rate.target not in targets:
            raise UsageError(f"no disk of the container is mounted at {rate.target}: a --device-* PATH is / (the "
                             "writable layer) or the path of one of its volumes")
    if quotas.network_rate and not networked:
        raise UsageError("--network-rate needs a network: the container has --network none")
    return quotas


def pod_of(ctx: Context, req: RunRequest) -> PodConfig | None:
    """--pod's pod; its network, ports and DNS are the pod's, as in podman."""
    if req.pod is None:
        return None
    pod = ctx.pods.find(req.pod)
    if req.publish:
        raise UsageError("ports belong to the pod: publish them with `micropod pod create -p`, not on a container "
                         "of the pod")
    if req.network is not None or req.dns:
        raise UsageError("the network belongs to the pod: give --network and --dns to `micropod pod create`")
    from micropod.service.pods import config

    cfg = config(ctx, pod)
    from micropod.quotas import parse_cpuset

    parse_cpuset(req.quotas.cpuset_cpus, available=set(range(cfg.vcpus)))  # the guest's CPUs, not the host's
    parse_cpuset(req.cpuset_mems, "cpuset_mems", available={0})
    if req.binds and not cfg.host_share:
        raise UsageError("a pod's container cannot bind-mount a host directory: a running VM takes no new shared "
                         "folder, and this pod has none; use a named volume (-v NAME:/path) instead")
    return cfg


def resolved_binds(binds: tuple[BindMount, ...], backend: str, files: bool = False) -> tuple[BindMount, ...]:
    """Each host directory (or, with ``files``, file: a pod's shared directory takes both) resolved now, by the
    user's own path; Firecracker has no way to share one."""
    if binds and backend != "qemu":
        raise UsageError(f"bind mounts of host directories need QEMU: {backend} has no shared filesystem; "
                         "use a named volume (-v NAME:/path) instead")
    resolved = []
    for bind in binds:
        path = Path(bind.source)
        if not (path.is_dir() or (files and path.is_file())):
            raise UsageError(f"invalid mount config for type \"bind\": bind source path does not exist or is "
                             f"not a directory: {bind.source}")
        resolved.append(replace(bind, source=str(path.resolve())))
    return tuple(resolved)


def checked_sysctls(sysctls: dict[str, str], flag: str = "--sysctl") -> dict[str, str]:
    """docker's --sysctl (and a CRI pod's): only those of a namespace the container or its pod has, as runc
    allows; the guest's kernel is the pod's, but its own settings are the in-guest runtime's layer of defence."""
    from micropod.runtime.spec_linux import SYSCTL_NAME, sysctl_namespace

    if len(sysctls) > 64:
        raise UsageError(f"too many sysctls ({len(sysctls)}): at most 64")
    for key, value in sysctls.items():
        if not SYSCTL_NAME.fullmatch(key):
            raise UsageError(f"invalid {flag} {key!r}: not a sysctl name")
        if sysctl_namespace(key) is None or key == "kernel.hostname":
            raise UsageError(f"invalid {flag} {key}: not in a namespace of the container (net.*, fs.mqueue.*, "
                             "kernel.msg*, kernel.sem, kernel.shm*, kernel.domainname)")
        if "\0" in value or len(value) > 4096:
            raise UsageError(f"invalid {flag} {key}: its value is too long or has a NUL")
    return dict(sysctls)
