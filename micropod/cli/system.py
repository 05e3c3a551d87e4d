"""inspect (containers and images) and doctor."""

from __future__ import annotations

import sys
from typing import Any

import click

from micropod.context import Context
from micropod.errors import MicropodError, NotFoundError

pass_ctx = click.make_pass_decorator(Context)


@click.command()
@click.option("--type", "kind", type=click.Choice(["container", "image"]), default=None)
@click.option("--format", "fmt", type=click.Choice(["json"]), default="json")
@click.argument("names", metavar="NAME|ID...", nargs=-1, required=True)
@pass_ctx
def inspect(ctx: Context, kind: str | None, fmt: str, names: tuple[str, ...]) -> None:
    """Show low-level information on containers or images, as JSON."""
    from micropod.cli.containers import container_inspect
    from micropod.cli.images import image_inspect
    from micropod.cli.output import json_document

    results: list[dict[str, Any]] = []
    missing = []
    records = ctx.state.reconcile() if kind != "image" else []
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


COMMANDS = [inspect, doctor]
