"""Container commands that only look: ps and logs, and what `inspect` shows of a container."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from micropod.context import Context
from micropod.errors import UsageError
from micropod.service.inspect import STATES, docker_state, iso
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


def _command_text(record: VmRecord) -> str:
    import shlex

    return shlex.join(record.argv)


@click.command(name="ps")
@click.option("-a", "--all", "show_all", is_flag=True, help="Show all containers, not only running ones.")
@click.option("-q", "--quiet", is_flag=True, help="Only show ids.")
@click.option("--no-trunc", is_flag=True, help="Do not truncate output.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("-f", "--filter", "filters", multiple=True,
              help="status=STATE, name=PART, id=PREFIX or pod=NAME|ID; a key given twice matches either value.")
@click.option("--pod", "show_pod", is_flag=True, help="Show the pod of each container (a POD column).")
@pass_ctx
def ps(ctx: Context, show_all: bool, quiet: bool, no_trunc: bool, fmt: str, filters: tuple[str, ...],
       show_pod: bool) -> None:
    """List containers."""
    from micropod.cli.output import json_lines, table, truncate
    from micropod.units import human_duration

    now = time.time()
    wanted = _parse_filters(filters)
    pods = _pod_names(ctx) if show_pod or fmt == "json" or "pod" in wanted else {}
    published = ctx.state.published_ports()
    # docker: a status filter looks at every container, as -a does
    records = [r for r in reconcile(ctx) if (show_all or "status" in wanted or r.status == "running")
               and _matches(r, wanted, pods)]
    if quiet:
        for record in records:
            click.echo(record.id if no_trunc else record.short_id)
        return
    if fmt == "json":
        json_lines([{
            "ID": record.id if no_trunc else record.short_id, "Image": record.image,
            "Command": _command_text(record), "CreatedAt": iso(record.created),
            "State": docker_state(record), "Status": _status_text(record, now), "Names": record.name,
            "ExitCode": record.exit_code, "Backend": record.backend,
            "Ports": _ports(published, record),
            "RestartCount": record.restart_count,
            "Pod": record.pod, "PodName": pods.get(record.pod, ""),
        } for record in records])
        return
    rows = [[
        record.id if no_trunc else record.short_id,
        record.image,
        f'"{_command_text(record) if no_trunc else truncate(_command_text(record), 20)}"',
        f"{human_duration(now - record.created)} ago",
        _status_text(record, now),
        _ports(published, record),
        record.name,
        *([pods.get(record.pod, "")] if show_pod else []),
    ] for record in records]
    table(["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES",
           *(["POD"] if show_pod else [])], rows)


def _pod_names(ctx: Context) -> dict[str, str]:
    """Pod id -> name, in one query."""
    return {pod.id: pod.name for pod in ctx.pods.all()}


def _parse_filters(filters: tuple[str, ...]) -> dict[str, set[str]]:
    wanted: dict[str, set[str]] = {}
    for item in filters:
        key, sep, value = item.partition("=")
        if not sep or key not in ("status", "name", "id", "pod"):
            raise UsageError(f"invalid filter {item!r}: use status=STATE, name=PART, id=PREFIX or pod=NAME|ID")
        if key == "status" and value not in STATES:
            raise UsageError(f"invalid filter {item!r}: the status is one of {', '.join(STATES)}")
        wanted.setdefault(key, set()).add(value)
    return wanted


def _matches(record: VmRecord, wanted: dict[str, set[str]], pods: dict[str, str]) -> bool:
    def one(key: str, value: str) -> bool:
        if key == "status":
            return docker_state(record) == value
        if key == "pod":
            return bool(record.pod) and (pods.get(record.pod) == value or record.pod.startswith(value))
        return value in record.name if key == "name" else record.id.startswith(value)

    return all(any(one(key, value) for value in values) for key, values in wanted.items())


def _ports(published: dict[str, list[dict[str, Any]]], record: VmRecord) -> str:
    """Like docker, only a running container shows its published ports (a pod's container, its pod's)."""
    from micropod.net.ports import PortMapping

    if record.status != "running":
        return ""
    return ", ".join(str(PortMapping(**port)) for port in published.get(record.pod or record.id, []))


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


COMMANDS = [ps, logs]
