"""Each VM's CPU, memory, network and block I/O and processes, sampled from its guest's counters through its
monitor; `stats` (micropod/cli/stats.py) shows two samples' difference.

CPU % is docker's: busy time over elapsed time of the guest's CPUs, times their number (so 200% is two
busy vCPUs). Memory is MemTotal - MemAvailable of the guest against the VM's memory.
"""

from __future__ import annotations

import select
import time
from dataclasses import dataclass
from typing import Any

from micropod import wire
from micropod.channel import decode
from micropod.errors import MicropodError
from micropod.monitor.api import Op
from micropod.monitor.client import MonitorClient

TIMEOUT = 3.0  # for every VM's answer together: a guest that does not answer shows "--" and holds no one up


@dataclass(frozen=True)
class Sample:
    cpu_total: int
    cpu_idle: int
    cpus: int
    mem_used: int
    mem_total: int
    block_read: int
    block_write: int
    pids: int
    net_rx: int = 0
    net_tx: int = 0

    @classmethod
    def of(cls, reply: dict[str, Any]) -> Sample | None:
        """The counters of a monitor's stats-reply (which checked them); None if it carries an error."""
        if reply.get("op") != Op.STATS_REPLY or "error" in reply or "message" in reply:
            return None
        values = {name: reply.get(name, 0) for name in cls.__dataclass_fields__}
        if not all(type(v) is int and v >= 0 for v in values.values()):
            return None
        return cls(**values)


def cpu_percent(before: Sample, after: Sample) -> float:
    total = after.cpu_total - before.cpu_total
    busy = total - (after.cpu_idle - before.cpu_idle)
    return 0.0 if total <= 0 else 100.0 * busy / total * after.cpus


def sample_all(clients: dict[str, MonitorClient], timeout: float = TIMEOUT) -> dict[str, Sample | None]:
    """One sample of each VM, asked of all at once and awaited together until ``timeout``; a VM that has not
    answered by then gets None, and its client is closed and removed (a late answer would be misread)."""
    taken: dict[str, Sample | None] = dict.fromkeys(clients)
    waiting: dict[int, str] = {}
    for vm_id, client in clients.items():
        try:
            client.request(Op.STATS)
            waiting[client.channel.fileno()] = vm_id
        except MicropodError:
            pass
    deadline = time.monotonic() + timeout
    while waiting and (remaining := deadline - time.monotonic()) > 0:
        try:
            readable, _, _ = select.select(list(waiting), [], [], remaining)
        except InterruptedError:
            continue
        for fd in readable:
            vm_id = waiting[fd]
            reply = _stats_reply(clients[vm_id])
            if reply is not None:
                taken[vm_id] = Sample.of(reply)
                del waiting[fd]
    for vm_id in waiting.values():
        clients.pop(vm_id).close()
    return taken


def _stats_reply(client: MonitorClient) -> dict[str, Any] | None:
    """What a readable monitor connection sent: its stats-reply (or exit, or an empty answer if it has gone)."""
    try:
        for kind, _, payload in client.channel.pump():
            if kind == wire.CONTROL:
                message = decode(payload)
                if message["op"] in (Op.STATS_REPLY, Op.EXIT, Op.ERROR):
                    return message
    except MicropodError:
        return {}
    return {} if client.channel.closed else None
