"""`micropod update`: new limits for a container, kept in its config.json for every later boot and applied at
once to a running VM through its monitor (micropod/monitor/update.py)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from micropod.context import Context
from micropod.errors import ContainerCommandError, MicropodError, UsageError
from micropod.monitor.api import Op
from micropod.monitor.client import MonitorClient
from micropod.quotas import DiskRate, Quotas
from micropod.runconfig import RestartPolicy, RunConfig
from micropod.state import ACTIVE, VmRecord

TIMEOUT = 30.0


@dataclass(frozen=True)
class UpdateRequest:
    """What to change; None (or empty) leaves a value as it is."""

    cpus: str | None = None
    memory: str | None = None
    pids_limit: int | None = None
    restart: str | None = None
    cpu_shares: int | None = None
    cpuset_cpus: str | None = None
    memory_reservation: str | None = None
    disk_rates: tuple[DiskRate, ...] = ()
    network_rate: int | None = None
    # A pod's container's cgroup limits exactly, as the CRI gives them (memory in bytes; 0: none).
    memory_limit: int | None = None
    cpu_quota: float | None = None
    cpuset_mems: str | None = None


def update(ctx: Context, record: VmRecord, req: UpdateRequest) -> None:
    """A pod's container's limits are its cgroup's in the pod's VM; another container's are its VM's."""
    vm_dir = ctx.root.vm(record.id)
    with _locked(vm_dir.path / "update.lock"):  # one update at a time: each applies what config.json says
        old = RunConfig.load(vm_dir.config)
        # A pod's monitor keeps the container's config while it is stopped too (its restart policy), so it is
        # told whenever the pod runs.
        running = bool(record.pod) or record.status in ACTIVE
        new = changed_in_pod(old, req, _pod_vcpus(ctx, record.pod)) if record.pod else changed(old, req, running)
        if new == old:
            return
        new.dump(vm_dir.config)
        if not running:
            return
        error = _apply(ctx, record)
        if error is not None:
            # Nothing half-done: the config goes back, and the running VM is told to take its old limits again.
            old.dump(vm_dir.config)
            _apply(ctx, record)
            raise ContainerCommandError(f"cannot update {record.name}: {error}", 125)


def _apply(ctx: Context, record: VmRecord) -> str | None:
    """The running VM takes its config.json's limits; why not, if it did not."""
    try:
        client = MonitorClient.of(ctx.root, record)
    except MicropodError:
        return None  # it has just ended: the next boot takes the config as it is
    try:
        client.request(Op.UPDATE)
        answer = client.follow(until=(Op.UPDATED, Op.ERROR), timeout=TIMEOUT)
    except MicropodError as exc:
        return str(exc)
    finally:
        client.close()
    return str(answer.get("message")) if answer["op"] == Op.ERROR else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def changed(cfg: RunConfig, req: UpdateRequest, running: bool) -> RunConfig:
    """``cfg`` with the request's changes, each checked against what a (running) VM can change."""
    from micropod.units import parse_cpus, parse_memory_mib

    if req.cpus is not None:
        vcpus = parse_cpus(req.cpus)
        if running and vcpus > cfg.vcpus:
            raise UsageError(f"invalid --cpus {req.cpus}: the running VM has {cfg.vcpus} vCPU(s), and a VM gets no "
                             "more while it runs; stop it first")
        cfg = replace(cfg, cpu_limit=float(req.cpus), vcpus=cfg.vcpus if running else vcpus)
    if req.memory is not None:
        if running:
            raise UsageError("a running VM's memory is fixed at boot: stop the container, then update --memory")
        cfg = replace(cfg, memory_mib=parse_memory_mib(req.memory))
    return replace(_restart_and_pids(cfg, req), quotas=_quotas(cfg, req))


def _pod_vcpus(ctx: Context, pod_id: str) -> int:
    from micropod.podconfig import PodConfig

    return PodConfig.load(ctx.root.pod(pod_id).config).vcpus


def changed_in_pod(cfg: RunConfig, req: UpdateRequest, vcpus: int) -> RunConfig:
    """``cfg`` of a pod's container (in a VM of ``vcpus``) with the request's cgroup limits; the VM's own quotas
    are the pod's."""
    from micropod.quotas import parse_cpu_shares, parse_cpuset
    from micropod.units import parse_cpus, parse_memory_mib

    if req.memory_reservation is not None or req.disk_rates or req.network_rate is not None:
        raise UsageError("a pod's container has only its cgroup's limits (--memory, --cpus, --cpu-shares, "
                         "--cpuset-cpus, --pids-limit); the VM's quotas belong to the pod")
    spec = cfg.container
    if req.cpus is not None:
        parse_cpus(req.cpus)
        spec = replace(spec, cpu_quota=min(float(req.cpus), float(vcpus)))
    if req.cpu_quota is not None:
        spec = replace(spec, cpu_quota=min(max(req.cpu_quota, 0.0), float(vcpus)))
    if req.memory is not None:
        spec = replace(spec, memory_limit=parse_memory_mib(req.memory) << 20)
    if req.memory_limit is not None:
        spec = replace(spec, memory_limit=max(req.memory_limit, 0))
    if req.cpu_shares is not None:
        spec = replace(spec, cpu_shares=parse_cpu_shares(req.cpu_shares))
    if req.cpuset_cpus is not None:
        spec = replace(spec, cpuset_cpus=parse_cpuset(req.cpuset_cpus, available=set(range(vcpus))))
    if req.cpuset_mems is not None:
        spec = replace(spec, cpuset_mems=parse_cpuset(req.cpuset_mems, "cpuset_mems", available={0}))
    return _restart_and_pids(replace(cfg, container=spec), req)


def _restart_and_pids(cfg: RunConfig, req: UpdateRequest) -> RunConfig:
    if req.pids_limit is not None:
        cfg = replace(cfg, container=replace(cfg.container, pids_limit=max(req.pids_limit, 0)))
    if req.restart is not None:
        policy = RestartPolicy.parse(req.restart)
        if cfg.auto_remove and policy.name != "no":
            raise UsageError("conflicting options: --restart and the container's --rm")
        cfg = replace(cfg, restart=policy)
    return cfg


def _quotas(cfg: RunConfig, req: UpdateRequest) -> Quotas:
    from micropod.units import parse_memory_mib

    quotas = cfg.quotas
    if req.cpu_shares is not None:
        quotas = replace(quotas, cpu_shares=req.cpu_shares)
    if req.cpuset_cpus is not None:
        quotas = replace(quotas, cpuset_cpus=req.cpuset_cpus)
    if req.memory_reservation is not None:
        reservation = parse_memory_mib(req.memory_reservation) if req.memory_reservation else 0
        quotas = replace(quotas, memory_reservation_mib=reservation)
    if req.disk_rates:
        targets = {"", "/"} | {v.target for v in cfg.container.volumes}
        rates = {rate.target: rate for rate in quotas.disk_rates}
        for rate in req.disk_rates:
            if rate.target not in targets:
                raise UsageError(f"no disk of the container is mounted at {rate.target}")
            rates[rate.target] = DiskRate(rate.target, rate.limits.over(rates[rate.target].limits)
                                          if rate.target in rates else rate.limits)
        quotas = replace(quotas, disk_rates=tuple(rates.values()))
    if req.network_rate is not None:
        if not cfg.network.enabled:
            raise UsageError("--network-rate needs a network: the container has --network none")
        quotas = replace(quotas, network_rate=req.network_rate)
    return quotas
