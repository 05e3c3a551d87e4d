"""`stats`: each VM's CPU, memory, network and block I/O and processes, from two samples of its guest's counters.

CPU % is docker's: busy time over elapsed time of the guest's CPUs, times their number (so 200% is two
busy vCPUs). Memory is MemTotal - MemAvailable of the guest against the VM's memory.
"""

from __future__ import annotations

import contextlib
import select
import time
from dataclasses import dataclass
from typing import Any

import click

from micropod import wire
from micropod.channel import decode
from micropod.context import Context
from micropod.errors import MicropodError
from micropod.monitor.api import Op
from micropod.monitor.client import MonitorClient
from micropod.service.reconcile import reconcile
from micropod.state import VmRecord

pass_ctx = click.make_pass_decorator(Context)
INTERVAL = 1.0
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


def row(record: VmRecord, before: Sample | None, after: Sample | None) -> dict[str, str]:
    from micropod.units import human_size

    if before is None or after is None:
        return {"ID": record.short_id, "Name": record.name, "CPUPerc": "--", "MemUsage": "-- / --",
                "MemPerc": "--", "NetIO": "--", "BlockIO": "--", "PIDs": "--"}
    mem = 100.0 * after.mem_used / after.mem_total if after.mem_total else 0.0
    return {
        "ID": record.short_id, "Name": record.name, "CPUPerc": f"{cpu_percent(before, after):.2f}%",
        "MemUsage": f"{human_size(after.mem_used)} / {human_size(after.mem_total)}", "MemPerc": f"{mem:.2f}%",
        "NetIO": f"{human_size(after.net_rx)} / {human_size(after.net_tx)}",
        "BlockIO": f"{human_size(after.block_read)} / {human_size(after.block_write)}",
        "PIDs": str(after.pids),
    }


@click.command()
@click.option("--no-stream", is_flag=True, help="Print one result and exit.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.argument("containers_", metavar="[CONTAINER...]", nargs=-1)
@pass_ctx
def stats(ctx: Context, no_stream: bool, fmt: str, containers_: tuple[str, ...]) -> None:
    """Show the running containers' resource usage, measured inside their VMs."""
    from micropod.cli.output import json_lines, table

    records = [ctx.state.find(c) for c in containers_] if containers_ else [
        r for r in reconcile(ctx) if r.status == "running"]
    clients: dict[str, MonitorClient] = {}

    def take() -> dict[str, Sample | None]:
        for record in records:  # again for a VM whose monitor did not answer last time
            if record.id not in clients:
                with contextlib.suppress(MicropodError):
                    clients[record.id] = MonitorClient.connect(ctx.root.vm(record.id))
        taken = sample_all(clients)
        return {r.id: taken.get(r.id) for r in records}

    try:
        previous = take()
        while True:
            time.sleep(INTERVAL)
            current = take()
            rows = [row(r, previous[r.id], current[r.id]) for r in records]
            previous = current
            if fmt == "json":
                json_lines(rows)
            else:
                if not no_stream:
                    click.echo("\x1b[2J\x1b[H", nl=False)
                table(["CONTAINER ID", "NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "NET I/O", "BLOCK I/O",
                       "PIDS"], [[r["ID"], r["Name"], r["CPUPerc"], r["MemUsage"], r["MemPerc"], r["NetIO"],
                                 r["BlockIO"], r["PIDs"]] for r in rows])
            if no_stream:
                return
    finally:
        for client in clients.values():
            client.close()


COMMANDS = [stats]
