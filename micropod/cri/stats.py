"""ContainerStats, PodSandboxStats and their lists: one sample of each container (its cgroup, from the guest) or
sandbox (its VM), all asked at once through their monitors. The guest's CPU counters are in USER_HZ ticks."""

from __future__ import annotations

import contextlib
import time

from micropod.context import Context
from micropod.cri import records
from micropod.cri.api import pb
from micropod.cri.containers import containers_reconciled
from micropod.cri.containers import find as find_container
from micropod.cri.records import ContainerInfo, SandboxInfo
from micropod.cri.sandboxes import cri_pods
from micropod.cri.sandboxes import find as find_sandbox
from micropod.errors import MicropodError
from micropod.monitor.client import MonitorClient
from micropod.runconfig import RunConfig
from micropod.service.housekeeping import allocated
from micropod.service.stats import Sample, sample_all
from micropod.state import VmRecord
from micropod.state.pods import PodRecord

TICK_NS = 10_000_000  # USER_HZ = 100


def _value(number: int) -> pb.UInt64Value:
    return pb.UInt64Value(value=max(0, number))


def _cpu(sample: Sample | None, now: int) -> pb.CpuUsage:
    if sample is None:
        return pb.CpuUsage(timestamp=now)
    return pb.CpuUsage(timestamp=now, usage_core_nano_seconds=_value((sample.cpu_total - sample.cpu_idle) * TICK_NS))


def _memory(sample: Sample | None, now: int) -> pb.MemoryUsage:
    if sample is None:
        return pb.MemoryUsage(timestamp=now)
    return pb.MemoryUsage(timestamp=now, working_set_bytes=_value(sample.mem_used), usage_bytes=_value(sample.mem_used),
                          available_bytes=_value(sample.mem_total - sample.mem_used))


def container_stats(ctx: Context, record: VmRecord, info: ContainerInfo, sample: Sample | None,
                    now: int) -> pb.ContainerStats:
    vm_dir = ctx.root.vm(record.id)
    labels = RunConfig.load(vm_dir.config).labels
    return pb.ContainerStats(
        attributes=pb.ContainerAttributes(id=record.id, metadata=pb.ContainerMetadata(name=info.name,
                                                                                      attempt=info.attempt),
                                          labels=labels, annotations=info.annotations),
        cpu=_cpu(sample, now), memory=_memory(sample, now),
        writable_layer=pb.FilesystemUsage(timestamp=now, fs_id=pb.FilesystemIdentifier(mountpoint=str(vm_dir.upper)),
                                          used_bytes=_value(allocated(vm_dir.upper))),
    )


def _samples(ctx: Context, records_: list[VmRecord]) -> dict[str, Sample | None]:
    clients: dict[str, MonitorClient] = {}
    for record in records_:
        if record.status == "running":
            with contextlib.suppress(MicropodError):
                clients[record.id] = MonitorClient.of(ctx.root, record)
    try:
        return sample_all(clients)
    finally:
        for client in clients.values():
            client.close()


def _pod_samples(ctx: Context, pods: list[PodRecord]) -> dict[str, Sample | None]:
    clients: dict[str, MonitorClient] = {}
    for pod in pods:
        if pod.status == "running":
            with contextlib.suppress(MicropodError):
                clients[pod.id] = MonitorClient.connect(ctx.root.pod(pod.id))
    try:
        return sample_all(clients)
    finally:
        for client in clients.values():
            client.close()


def _cri_containers(ctx: Context) -> list[tuple[VmRecord, ContainerInfo]]:
    found = []
    for record in containers_reconciled(ctx):
        info = records.load_container(ctx.root.vm(record.id).path)
        if info is not None:
            found.append((record, info))
    return found


def _labels_match(labels: dict[str, str], selector: object) -> bool:
    return all(labels.get(k) == v for k, v in dict(selector).items())  # type: ignore[call-overload]


class Stats:
    service = "RuntimeService"

    def ContainerStats(self, ctx: Context, request: pb.ContainerStatsRequest) -> pb.ContainerStatsResponse:
        record, info = find_container(ctx, request.container_id)
        samples = _samples(ctx, [record])
        return pb.ContainerStatsResponse(stats=container_stats(ctx, record, info, samples.get(record.id),
                                                               time.time_ns()))

    def ListContainerStats(self, ctx: Context,
                           request: pb.ListContainerStatsRequest) -> pb.ListContainerStatsResponse:
        wanted = request.filter
        chosen = [(r, i) for r, i in _cri_containers(ctx) if r.status == "running"
                  and (not wanted.id or r.id.startswith(wanted.id))
                  and (not wanted.pod_sandbox_id or i.sandbox_id.startswith(wanted.pod_sandbox_id))
                  and _labels_match(RunConfig.load(ctx.root.vm(r.id).config).labels, wanted.label_selector)]
        samples = _samples(ctx, [r for r, _ in chosen])
        now = time.time_ns()
        return pb.ListContainerStatsResponse(stats=[container_stats(ctx, r, i, samples.get(r.id), now)
                                                    for r, i in chosen])

    def PodSandboxStats(self, ctx: Context, request: pb.PodSandboxStatsRequest) -> pb.PodSandboxStatsResponse:
        pod, info = find_sandbox(ctx, request.pod_sandbox_id)
        return pb.PodSandboxStatsResponse(stats=self._sandbox_stats(ctx, [(pod, info)])[0])

    def ListPodSandboxStats(self, ctx: Context,
                            request: pb.ListPodSandboxStatsRequest) -> pb.ListPodSandboxStatsResponse:
        wanted = request.filter
        chosen = [(p, i) for p, i in cri_pods(ctx) if p.status == "running"
                  and (not wanted.id or p.id.startswith(wanted.id)) and _labels_match(p.label_map,
                                                                                    wanted.label_selector)]
        return pb.ListPodSandboxStatsResponse(stats=self._sandbox_stats(ctx, chosen))

    def _sandbox_stats(self, ctx: Context, chosen: list[tuple[PodRecord, SandboxInfo]]) -> list[pb.PodSandboxStats]:
        vm_samples = _pod_samples(ctx, [p for p, _ in chosen])
        members = [(r, i) for r, i in _cri_containers(ctx) if r.status == "running"
                   and any(i.sandbox_id == p.id for p, _ in chosen)]
        samples = _samples(ctx, [r for r, _ in members])
        now = time.time_ns()
        out = []
        for pod, info in chosen:
            sample = vm_samples.get(pod.id)
            out.append(pb.PodSandboxStats(
                attributes=pb.PodSandboxAttributes(id=pod.id, metadata=pb.PodSandboxMetadata(
                    name=info.name, uid=info.uid, namespace=info.namespace, attempt=info.attempt),
                    labels=pod.label_map, annotations=info.annotations),
                linux=pb.LinuxPodSandboxStats(
                    cpu=_cpu(sample, now), memory=_memory(sample, now),
                    process=pb.ProcessUsage(timestamp=now, process_count=_value(sample.pids if sample else 0)),
                    containers=[container_stats(ctx, r, i, samples.get(r.id), now) for r, i in members
                                if i.sandbox_id == pod.id]),
            ))
        return out
