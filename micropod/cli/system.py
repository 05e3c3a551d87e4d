"""inspect (containers and images) and doctor."""

from __future__ import annotations

import sys
from typing import Any

import click

from micropod.context import Context
from micropod.errors import MicropodError, NotFoundError
from micropod.service.reconcile import reconcile

pass_ctx = click.make_pass_decorator(Context)


@click.command()
@click.option("--type", "kind", type=click.Choice(["container", "image"]), default=None)
@click.option("--format", "fmt", type=click.Choice(["json"]), default="json")
@click.argument("names", metavar="NAME|ID...", nargs=-1, required=True)
@pass_ctx
def inspect(ctx: Context, kind: str | None, fmt: str, names: tuple[str, ...]) -> None:
    """Show low-level information on containers or images, as JSON."""
    from micropod.cli.images import image_inspect
    from micropod.cli.output import json_document
    from micropod.service.inspect import container_inspect

    results: list[dict[str, Any]] = []
    missing = []
    records = reconcile(ctx) if kind != "image" else []
    del records
    for name in names:
        try:
            if kind != "image":
                try:
                    results.append(container_inspect(ctx, ctx.state.find(name)))
                    continue
                except NotFoundError:
                    if kind == "container":
                        raise
            results.append(image_inspect(ctx.images.resolve(name)))
        except NotFoundError:
            missing.append(name)
    json_document(results)
    for name in missing:
        click.echo(f"micropod: error: No such object: {name}", err=True)
    if missing:
        sys.exit(1)


@click.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@pass_ctx
def doctor(ctx: Context, fmt: str) -> None:
    """Say which VMMs and guest artefacts are usable on this host, and why."""
    from micropod.cli.output import json_lines
    from micropod.doctor import run_checks

    checks = run_checks(ctx.root)
    if fmt == "json":
        json_lines([{"check": c.name, "ok": c.ok, "detail": c.detail, "required": c.required}
                    for c in checks])
    else:
        for check in checks:
            mark = "ok  " if check.ok else ("FAIL" if check.required else "--  ")
            click.echo(f"[{mark}] {check.name}: {check.detail}")
    if any(c.required and not c.ok for c in checks):
        raise MicropodError("micropod cannot run VMs on this host yet; fix the FAIL lines above")


@click.command(name="df")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@pass_ctx
def system_df(ctx: Context, fmt: str) -> None:
    """Show micropod's disk usage: images, containers (their VM dirs), the rootfs cache and boot snapshots."""
    from micropod.cli.output import json_lines, table
    from micropod.service.housekeeping import disk_usage
    from micropod.units import human_size

    usage = disk_usage(ctx)
    if fmt == "json":
        json_lines([{"Type": u.kind, "TotalCount": u.total, "Active": u.active, "Size": human_size(u.size),
                     "Reclaimable": human_size(u.reclaimable)} for u in usage])
        return
    table(["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"],
          [[u.kind, str(u.total), str(u.active), human_size(u.size), human_size(u.reclaimable)] for u in usage])


@click.command(name="prune")
@click.option("-f", "--force", is_flag=True, help="Do not prompt for confirmation.")
@pass_ctx
def system_prune(ctx: Context, force: bool) -> None:
    """Remove stopped containers, the rootfs bases no container uses and the boot snapshots (images: `image
    prune`)."""
    from micropod.service.housekeeping import prune
    from micropod.units import human_size

    if not force and not click.confirm(
        "WARNING! This will remove:\n  - all stopped containers\n  - every rootfs base no container uses\n"
        "  - every boot snapshot (running VMs keep theirs)\n"
        "Are you sure you want to continue?", default=False):
        return
    result = prune(ctx)
    if result.containers:
        click.echo("Deleted Containers:")
        for vm_id in result.containers:
            click.echo(vm_id)
    if result.rootfs:
        click.echo("Deleted rootfs bases:")
        for path in result.rootfs:
            click.echo(path.name)
    if result.snapshots:
        click.echo("Deleted boot snapshots:")
        for path in result.snapshots:
            click.echo(path.stem)
    click.echo(f"\nTotal reclaimed space: {human_size(result.reclaimed)}")


def _extend_system_group() -> None:
    """`system df` and `system prune` join the `system` group that cli/registry.py defines."""
    from micropod.cli.registry import system_group

    for command in (system_df, system_prune):
        system_group.add_command(command)


_extend_system_group()

COMMANDS = [inspect, doctor]
