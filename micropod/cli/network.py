"""`micropod port`, and how a container's network shows in `ps` and `inspect`."""

from __future__ import annotations

from typing import Any

import click

from micropod.context import Context
from micropod.errors import NotFoundError, UsageError
from micropod.runconfig import NetworkSettings, RunConfig

pass_ctx = click.make_pass_decorator(Context)


def load_settings(ctx: Context, vm_id: str) -> NetworkSettings:
    cfg = RunConfig.load_if_present(ctx.root.vm(vm_id).config)
    return cfg.network if cfg else NetworkSettings()


def ports_column(settings: NetworkSettings) -> str:
    return ", ".join(str(port) for port in settings.ports)


def network_inspect(settings: NetworkSettings) -> dict[str, Any]:
    """docker's NetworkSettings block, plus the TAP and bridge a microVM has."""
    ports: dict[str, list[dict[str, str]]] = {}
    for port in settings.ports:
        ports.setdefault(f"{port.guest_port}/{port.protocol}", []).append(
            {"HostIp": port.host_ip or "0.0.0.0", "HostPort": str(port.host_port)})
    if not settings.enabled:
        return {"Mode": settings.mode, "IPAddress": "", "MacAddress": "", "Gateway": "", "IPPrefixLen": 0,
                "Ports": {}}
    from micropod.net.lifecycle import network_of

    network = network_of(settings)
    return {"Mode": settings.mode, "Bridge": settings.bridge, "Tap": settings.tap, "IPAddress": settings.ip,
            "IPPrefixLen": network.subnet.prefixlen, "Gateway": str(network.gateway),
            "MacAddress": settings.mac, "Ports": ports}


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
