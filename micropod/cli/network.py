"""`micropod port`: a container's published ports (ps and inspect show them: micropod/service/inspect.py)."""

from __future__ import annotations

import click

from micropod.context import Context
from micropod.errors import NotFoundError, UsageError
from micropod.runconfig import NetworkSettings
from micropod.service.inspect import load_settings

pass_ctx = click.make_pass_decorator(Context)


@click.command()
@click.argument("container")
@click.argument("private_port", required=False)
@pass_ctx
def port(ctx: Context, container: str, private_port: str | None) -> None:
    """List a container's published ports, or the host side of one of them (PORT[/PROTO])."""
    record = ctx.state.find(container)
    # like docker, a container that is not running publishes nothing
    settings = load_settings(ctx, record.id) if record.status == "running" else NetworkSettings()
    wanted: tuple[int, str] | None = None
    if private_port is not None:
        number, _, protocol = private_port.partition("/")
        if not number.isdigit() or protocol not in ("", "tcp", "udp"):
            raise UsageError(f"invalid port {private_port!r}: use PORT[/tcp|udp]")
        wanted = (int(number), protocol or "tcp")
    shown = 0
    for mapping in settings.ports:
        if wanted is not None and (mapping.guest_port, mapping.protocol) != wanted:
            continue
        host = f"{mapping.host_ip or '0.0.0.0'}:{mapping.host_port}"
        click.echo(host if wanted else f"{mapping.guest_port}/{mapping.protocol} -> {host}")
        shown += 1
    if wanted is not None and not shown:
        raise NotFoundError(f"no public port '{wanted[0]}/{wanted[1]}' published for {record.name}")


COMMANDS = [port]
