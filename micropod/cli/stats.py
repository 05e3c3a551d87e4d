"""`stats`: each VM's CPU, memory, network and block I/O and processes, from two samples
(micropod/service/stats.py) of its guest's counters."""

from __future__ import annotations

import contextlib
import time

import click

from micropod.context import Context
from micropod.errors import MicropodError
from micropod.monitor.client import MonitorClient
from micropod.service.reconcile import reconcile
from micropod.service.stats import Sample, cpu_percent, sample_all
from micropod.state import VmRecord

pass_ctx = click.make_pass_decorator(Context)
INTERVAL = 1.0


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
                    clients[record.id] = MonitorClient.of(ctx.root, record)
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
