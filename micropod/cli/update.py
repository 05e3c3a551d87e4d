"""docker's `update`: change a container's limits, running or not."""

from __future__ import annotations

from typing import Any

import click

from micropod.cli.containers import each_container
from micropod.context import Context
from micropod.state import VmRecord

pass_ctx = click.make_pass_decorator(Context)


@click.command()
@click.option("--cpus", help="CPUs' worth of time for the VM (a running VM keeps its vCPUs), or for a pod's "
              "container's cgroup.")
@click.option("-m", "--memory", help="The VM's memory (only while it is stopped), or a pod's container's cgroup's.")
@click.option("--pids-limit", type=int, help="At most this many processes in the container (0 or -1: none).")
@click.option("--restart", "restart_policy", help="no, on-failure[:N], always or unless-stopped.")
@click.option("--cpu-shares", type=int, help="The VMM's CPU weight against other VMs (a pod's container's: its "
              "cgroup's).")
@click.option("--cpuset-cpus", help="Host CPUs the VMM may run on ('' for any); a pod's container's: vCPUs.")
@click.option("--memory-reservation", help="The VMM's soft memory limit ('' for none).")
@click.option("--device-read-bps", multiple=True, help="[PATH:]RATE")
@click.option("--device-write-bps", multiple=True, help="[PATH:]RATE")
@click.option("--device-read-iops", multiple=True, help="[PATH:]N")
@click.option("--device-write-iops", multiple=True, help="[PATH:]N")
@click.option("--network-rate", help="Bytes per second each way on the VM's NIC (0 for none).")
@click.argument("containers_", metavar="CONTAINER...", nargs=-1, required=True)
@pass_ctx
def update(ctx: Context, /, containers_: tuple[str, ...], **options: Any) -> None:
    """Change containers' limits: at once on a running VM, and for every later boot."""
    from micropod.quotas import parse_cpu_shares, parse_cpuset, parse_disk_rates, parse_rate
    from micropod.service.update import UpdateRequest
    from micropod.service.update import update as update_container

    rate = options["network_rate"]
    flags = {f"--{name.replace('_', '-')}": tuple(options[name])
             for name in ("device_read_bps", "device_write_bps", "device_read_iops", "device_write_iops")}
    shares, cpuset = options["cpu_shares"], options["cpuset_cpus"]
    request = UpdateRequest(
        cpus=options["cpus"], memory=options["memory"],
        pids_limit=options["pids_limit"], restart=options["restart_policy"],
        cpu_shares=parse_cpu_shares(shares) if shares is not None else None,
        cpuset_cpus=parse_cpuset(cpuset) if cpuset is not None else None,
        memory_reservation=options["memory_reservation"],
        disk_rates=parse_disk_rates(flags),
        network_rate=None if rate is None else 0 if rate == "0" else parse_rate(rate, "--network-rate"),
    )

    def action(record: VmRecord, ident: str) -> None:
        update_container(ctx, record, request)
        click.echo(ident)

    each_container(ctx, containers_, action)

COMMANDS = [update]
