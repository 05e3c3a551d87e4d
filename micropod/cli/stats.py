"""`stats`: each VM's CPU, memory, network and block I/O and processes, from two samples of its guest's counters.

CPU % is docker's: busy time over elapsed time of the guest's CPUs, times their number (so 200% is two
busy vCPUs). Memory is MemTotal - MemAvailable of the guest against the VM's memory.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import click

from micropod.context import Context
from micropod.errors import MicropodError
from micropod.monitorclient import MonitorClient
from micropod.net.lifecycle import reconcile
from micropod.state import VmRecord

pass_ctx = click.make_pass_decorator(Context)
INTERVAL = 1.0


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
    def of(cls, reply: dict[str, Any]) -> Sample:
        return cls(**{name: int(reply[name]) for name in cls.__dataclass_fields__ if name in reply})


def cpu_percent(before: Sample, after: Sample) -> float:
    total = after.cpu_total - before.cpu_total
    busy = total - (after.cpu_idle - before.cpu_idle)
    return 0.0 if total <= 0 else 100.0 * busy / total * after.cpus


def sample(client: MonitorClient) -> Sample | None:
    client.request("stats")
    reply = client.interact(lambda *_: None, until=("stats-reply",))
    if reply["op"] != "stats-reply" or "error" in reply or "message" in reply:
        return None
    return Sample.of(reply)


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
    clients: dict[str, MonitorClient | None] = {}
    for record in records:
        try:
            clients[record.id] = MonitorClient.connect(ctx.root.vm(record.id))
        except MicropodError:
            clients[record.id] = None

    def take() -> dict[str, Sample | None]:
        taken: dict[str, Sample | None] = {}
        for vm_id, client in clients.items():
            taken[vm_id] = None
            if client is not None:
                with contextlib.suppress(MicropodError):
                    taken[vm_id] = sample(client)
        return taken

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
            if client is not None:
                client.close()


COMMANDS = [stats]
