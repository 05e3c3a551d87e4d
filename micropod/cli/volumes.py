"""docker volume: create, ls, inspect, rm and prune, over micropod/volumes.py."""

from __future__ import annotations

import click

from micropod.cli.output import json_document, json_lines, table
from micropod.context import Context
from micropod.errors import UsageError
from micropod.units import human_size, parse_size

pass_ctx = click.make_pass_decorator(Context)


@click.group()
def volume() -> None:
    """Manage named volumes (ext4 disks that outlive containers)."""


def key_values(items: tuple[str, ...], flag: str) -> dict[str, str]:
    """KEY=VALUE options (--label, --opt); a bare KEY has the empty value."""
    found = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key:
            raise UsageError(f"invalid {flag} {item!r}: use KEY=VALUE")
        found[key] = value if sep else ""
    return found


@volume.command("create")
@click.argument("name", required=False)
@click.option("--name", "name_option", help="The volume's name (or give it as the argument).")
@click.option("-o", "--opt", "opts", multiple=True, help="size=SIZE (default 10G, sparse).")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE")
@pass_ctx
def create(ctx: Context, name: str | None, name_option: str | None, opts: tuple[str, ...],
           labels: tuple[str, ...]) -> None:
    if name and name_option and name != name_option:
        raise UsageError(f"conflicting volume names: {name!r} and --name {name_option!r}")
    options = key_values(opts, "--opt")
    unknown = sorted(set(options) - {"size"})
    if unknown:
        raise UsageError(f"unknown volume option {unknown[0]!r}: micropod volumes take size=")
    kwargs = {"size": parse_size(options["size"])} if "size" in options else {}
    made = ctx.volumes.create(name or name_option, labels=key_values(labels, "--label"), **kwargs)
    click.echo(made.name)


@volume.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="Only the names.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@pass_ctx
def ls(ctx: Context, quiet: bool, fmt: str) -> None:
    volumes = ctx.volumes.all()
    if quiet:
        for found in volumes:
            click.echo(found.name)
    elif fmt == "json":
        json_lines([{"Driver": "local", "Name": v.name, "Size": human_size(v.size), "Labels": v.labels,
                     "Mountpoint": str(v.path), "Scope": "local"} for v in volumes])
    else:
        table(["DRIVER", "VOLUME NAME"], [["local", v.name] for v in volumes])


@volume.command("inspect")
@click.argument("names", nargs=-1, required=True)
@pass_ctx
def inspect(ctx: Context, names: tuple[str, ...]) -> None:
    json_document([ctx.volumes.get(name).inspect() for name in names])


@volume.command("rm")
@click.option("-f", "--force", is_flag=True, help="Do not mind volumes that do not exist.")
@click.argument("names", nargs=-1, required=True)
@pass_ctx
def rm(ctx: Context, force: bool, names: tuple[str, ...]) -> None:
    for name in names:
        if ctx.volumes.remove(name, force=force):
            click.echo(name)


@volume.command("prune")
@click.option("-a", "--all", "include_named", is_flag=True, help="Named volumes too, not only anonymous ones.")
@click.option("-f", "--force", is_flag=True, help="Do not ask (micropod never asks).")
@pass_ctx
def prune(ctx: Context, include_named: bool, force: bool) -> None:
    removed = ctx.volumes.prune(include_named=include_named)
    if removed:
        click.echo("Deleted Volumes:")
        for name in removed:
            click.echo(name)


COMMANDS = [volume]
