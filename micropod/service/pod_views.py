"""What `pod ps`, `pod inspect` and `pod logs` show, as data."""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Any

from micropod.containerlog import LogEntry, LogReader
from micropod.context import Context
from micropod.errors import NotFoundError
from micropod.service.inspect import docker_state, iso
from micropod.service.reconcile import reconcile
from micropod.state import VmRecord
from micropod.state.pods import PodRecord


def summaries(ctx: Context) -> list[dict[str, Any]]:
    """Every pod, with its containers, from two queries (the pods, and the containers once)."""
    records = reconcile(ctx)
    by_pod: dict[str, list[VmRecord]] = {}
    for record in records:
        if record.pod:
            by_pod.setdefault(record.pod, []).append(record)
    return [{
        "Id": pod.id, "Name": pod.name, "Status": pod.status, "CreatedAt": pod.created,
        "Created": iso(pod.created), "Labels": pod.label_map,
        "NumberOfContainers": len(by_pod.get(pod.id, [])),
        "Containers": [{"Id": r.id, "Names": r.name, "Status": docker_state(r)} for r in by_pod.get(pod.id, [])],
    } for pod in ctx.pods.reconcile()]


def inspect(ctx: Context, pod: PodRecord) -> dict[str, Any]:
    from micropod.service.pods import config, members

    reconcile(ctx)
    fresh = ctx.pods.get(pod.id) or pod
    cfg = config(ctx, fresh)
    network = cfg.network
    containers = members(ctx, fresh)
    return {
        "Id": fresh.id, "Name": fresh.name, "Created": iso(fresh.created), "State": fresh.status,
        "Error": fresh.error or "", "Hostname": cfg.hostname, "Labels": fresh.label_map,
        "NumContainers": len(containers),
        "Containers": [{"Id": r.id, "Name": r.name, "State": docker_state(r)} for r in containers],
        "VM": {"Backend": cfg.backend, "CPUs": cfg.vcpus, "NanoCpus": int((cfg.cpu_limit or cfg.vcpus) * 1e9),
               "MemoryMiB": cfg.memory_mib, "DrivePool": cfg.pool,
               "VmmPid": fresh.vmm_pid or 0, "MonitorPid": fresh.monitor_pid or 0},
        "NetworkSettings": {"Mode": network.mode, "IPAddress": network.ip, "MacAddress": network.mac,
                            "Bridge": network.bridge, "Tap": network.tap,
                            "Ports": [str(p) for p in network.ports]},
    }


def merged_logs(ctx: Context, pod: PodRecord, tail: int | None,
                container: str | None) -> Iterator[tuple[str, LogEntry]]:
    """Each container's log (its last ``tail`` entries), merged in time order, with the container's name."""
    from micropod.service.pods import members

    chosen = members(ctx, pod)
    if container is not None:
        chosen = [r for r in chosen if container in (r.name, r.id) or r.id.startswith(container)]
        if not chosen:
            raise NotFoundError(f"no container {container} in pod {pod.name}")

    def entries(record: VmRecord) -> Iterator[tuple[float, str, LogEntry]]:
        reader = LogReader(ctx.root.vm(record.id).container_log)
        for entry in reader.recent(tail, None) if tail is not None else reader.backlog():
            yield entry.timestamp, record.name, entry

    for _, name, entry in heapq.merge(*(entries(r) for r in chosen), key=lambda item: item[0]):
        yield name, entry
