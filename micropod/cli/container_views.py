"""Container commands that only look: ps and logs, and what `inspect` shows of a container."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from typing import Any

import click

from micropod.context import Context
from micropod.errors import UsageError
from micropod.service.reconcile import reconcile
from micropod.state import VmRecord

pass_ctx = click.make_pass_decorator(Context)


def _status_text(record: VmRecord, now: float) -> str:
    from micropod.units import human_duration

    if record.status == "running":
        alive = record.monitor is not None and record.monitor.alive()
        since = human_duration(now - (record.started or record.created))
        return f"Up {since}" + ("" if alive else " (monitor lost)")
    if record.status == "exited":
        ago = human_duration(now - (record.finished or now))
        return f"Exited ({record.exit_code}) {ago} ago"
    if record.status == "restarting":
        ago = human_duration(now - (record.finished or now))
        return f"Restarting ({record.exit_code}) {ago} ago"
    if record.status == "dead":
        return "Dead"
    return "Created"


def _iso(ts: float | None) -> str:
    if ts is None:
        return "0001-01-01T00:00:00Z"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _command_text(record: VmRecord) -> str:
    import shlex

    return shlex.join(record.argv)


@click.command(name="ps")
@click.option("-a", "--all", "show_all", is_flag=True, help="Show all containers, not only running ones.")
@click.option("-q", "--quiet", is_flag=True, help="Only show ids.")
@click.option("--no-trunc", is_flag=True, help="Do not truncate output.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("-f", "--filter", "filters", multiple=True,
              help="status=STATE, name=PART or id=PREFIX; a key given twice matches either value.")
@pass_ctx
def ps(ctx: Context, show_all: bool, quiet: bool, no_trunc: bool, fmt: str, filters: tuple[str, ...]) -> None:
    """List containers."""
    from micropod.cli.output import json_lines, table, truncate
    from micropod.units import human_duration

    now = time.time()
    wanted = _parse_filters(filters)
    # docker: a status filter looks at every container, as -a does
    records = [r for r in reconcile(ctx) if (show_all or "status" in wanted or r.status == "running")
               and _matches(r, wanted)]
    if quiet:
        for record in records:
            click.echo(record.id if no_trunc else record.short_id)
        return
    if fmt == "json":
        json_lines([{
            "ID": record.id if no_trunc else record.short_id, "Image": record.image,
            "Command": _command_text(record), "CreatedAt": _iso(record.created),
            "State": docker_state(record), "Status": _status_text(record, now), "Names": record.name,
            "ExitCode": record.exit_code, "Backend": record.backend,
            "Ports": _ports(ctx, record),
            "RestartCount": record.restart_count,
        } for record in records])
        return
    rows = [[
        record.id if no_trunc else record.short_id,
        record.image,
        f'"{_command_text(record) if no_trunc else truncate(_command_text(record), 20)}"',
        f"{human_duration(now - record.created)} ago",
        _status_text(record, now),
        _ports(ctx, record),
        record.name,
    ] for record in records]
    table(["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"], rows)


_STATES = ("created", "running", "restarting", "exited", "dead")


def docker_state(record: VmRecord) -> str:
    """The record's status as docker names states: a container made by `create` is "created" too."""
    return "created" if record.status == "configured" else record.status


def _parse_filters(filters: tuple[str, ...]) -> dict[str, set[str]]:
    wanted: dict[str, set[str]] = {}
    for item in filters:
        key, sep, value = item.partition("=")
        if not sep or key not in ("status", "name", "id"):
            raise UsageError(f"invalid filter {item!r}: use status=STATE, name=PART or id=PREFIX")
        if key == "status" and value not in _STATES:
            raise UsageError(f"invalid filter {item!r}: the status is one of {', '.join(_STATES)}")
        wanted.setdefault(key, set()).add(value)
    return wanted


def _matches(record: VmRecord, wanted: dict[str, set[str]]) -> bool:
    def one(key: str, value: str) -> bool:
        if key == "status":
            return docker_state(record) == value
        return value in record.name if key == "name" else record.id.startswith(value)

    return all(any(one(key, value) for value in values) for key, values in wanted.items())


def _ports(ctx: Context, record: VmRecord) -> str:
    """Like docker, only a running container shows its published ports."""
    from micropod.cli.network import load_settings, ports_column

    return ports_column(load_settings(ctx, record.id)) if record.status == "running" else ""


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Follow the log output.")
@click.option("-t", "--timestamps", is_flag=True, help="Show timestamps.")
@click.option("-n", "--tail", default="all", help="Number of lines to show from the end.")
@click.option("--since", help="Show logs since a time (RFC3339, Unix timestamp, or relative like 10m).")
@click.option("--until", help="Show logs before a time (RFC3339, Unix timestamp, or relative like 10m).")
@click.argument("container")
@pass_ctx
def logs(ctx: Context, follow: bool, timestamps: bool, tail: str, since: str | None, until: str | None,
         container: str) -> None:
    """Show a container's output (stdout to stdout, stderr to stderr), across rotated log files."""
    from micropod.containerlog import LogEntry, LogReader, parse_since

    record = ctx.state.find(container)
    path = ctx.root.vm(record.id).container_log
    if tail != "all" and not tail.isdigit():
        raise UsageError(f"invalid --tail {tail!r}: a number or 'all'")
    start = parse_since(since) if since else None
    end = parse_since(until) if until else None

    def wanted(entry: LogEntry) -> bool:
        if start is None and end is None:
            return True
        ts = entry.timestamp
        return (start is None or ts >= start) and (end is None or ts < end)

    def emit(entry: LogEntry) -> None:
        target = sys.stdout.buffer if entry.stream == "stdout" else sys.stderr.buffer
        if timestamps:
            target.write(entry.time.encode() + b" ")
        target.write(entry.data)
        target.flush()

    reader = LogReader(path)
    try:
        if tail == "all" and start is None:
            entries = [e for e in reader.backlog() if wanted(e)]
        else:
            entries = reader.recent(None if tail == "all" else int(tail), start, wanted)
        for entry in entries:
            emit(entry)
        while follow and (end is None or time.time() < end):
            fresh = ctx.state.get(record.id)
            more = [e for e in reader.more() if wanted(e)]
            for entry in more:
                emit(entry)
            if fresh is None or fresh.status not in ("created", "running"):
                break
            if not more:
                time.sleep(0.1)
    finally:
        reader.close()


def container_inspect(ctx: Context, record: VmRecord) -> dict[str, Any]:
    from micropod.cli.network import network_inspect
    from micropod.runconfig import NetworkSettings, RunConfig

    vm_dir = ctx.root.vm(record.id)
    cfg = RunConfig.load_if_present(vm_dir.config)
    vmm = record.vmm
    network = network_inspect(cfg.network if cfg else NetworkSettings())
    return {
        "Id": record.id,
        "Created": _iso(record.created),
        "Path": record.argv[0] if record.argv else "",
        "Args": record.argv[1:],
        "State": {
            "Status": docker_state(record),
            "Running": record.status == "running",
            "Dead": record.status == "dead",
            "Pid": vmm.pid if vmm and vmm.alive() else 0,
            "ExitCode": record.exit_code if record.exit_code is not None else 0,
            "Error": record.error or "",
            "StartedAt": _iso(record.started),
            "FinishedAt": _iso(record.finished),
            "MonitorAlive": bool(record.monitor and record.monitor.alive()),
        },
        "Image": f"sha256:{record.image_id}",
        "Name": f"/{record.name}",
        "RestartCount": record.restart_count,
        "Config": {
            "Hostname": cfg.container.hostname if cfg else "",
            "User": cfg.container.user if cfg else "",
            "Env": list(cfg.container.env) if cfg else [],
            "Cmd": record.argv,
            "Image": record.image,
            "WorkingDir": cfg.container.cwd if cfg else "",
        },
        "HostConfig": {
            "AutoRemove": bool(record.auto_remove),
            "RestartPolicy": {"Name": cfg.restart.name if cfg else "no",
                              "MaximumRetryCount": cfg.restart.max_retries if cfg else 0},
            "LogConfig": {"Type": "json-file", "Config": {
                "max-size": str(cfg.log.max_size) if cfg and cfg.log.max_size else "",
                "max-file": str(cfg.log.max_files) if cfg else "1"}},
            "Memory": (cfg.memory_mib << 20) if cfg else 0,
            "NanoCpus": (cfg.vcpus * 10**9) if cfg else 0,
            "NetworkMode": cfg.network.mode if cfg else "none",
            "PortBindings": network["Ports"],
        },
        "NetworkSettings": network,
        "VM": {
            "Backend": record.backend,
            "Vcpus": cfg.vcpus if cfg else 0,
            "MemoryMiB": cfg.memory_mib if cfg else 0,
            "Kernel": cfg.kernel if cfg else "",
            "SystemImage": cfg.system if cfg else "",
            "Rootfs": cfg.rootfs if cfg else "",
            "Dir": str(vm_dir.path),
            "ConsoleLog": str(vm_dir.console_log),
        },
        "LogPath": str(vm_dir.container_log),
    }
