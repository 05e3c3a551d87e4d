"""Container commands: run, ps, stop, kill, rm, logs, inspect, wait."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from micropod import containers
from micropod.cli.security import security_options
from micropod.context import Context
from micropod.errors import MicropodError, NotFoundError, UsageError
from micropod.net.lifecycle import reconcile
from micropod.runconfig import SecurityOptions
from micropod.state import VmRecord

pass_ctx = click.make_pass_decorator(Context)


@click.command(context_settings={"ignore_unknown_options": False, "allow_interspersed_args": False})
@click.option("-d", "--detach", is_flag=True, help="Run in the background and print the container id.")
@click.option("-i", "--interactive", is_flag=True, help="Keep STDIN open and forward it to the container.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-TTY for the container's process.")
@click.option("--rm", "auto_remove", is_flag=True, help="Remove the container when it exits.")
@click.option("--name", help="Assign a name to the container.")
@click.option("-e", "--env", multiple=True, help="Set an environment variable (KEY=VALUE, or KEY).")
@click.option("--env-file", multiple=True, type=click.Path(path_type=Path), help="Read variables from a file.")
@click.option("-w", "--workdir", help="Working directory inside the container.")
@click.option("-u", "--user", help="User name or uid[:gid] to run as.")
@click.option("--entrypoint", help="Override the image's entrypoint.")
@click.option("-h", "--hostname", help="Container host name (default: the short id).")
@click.option("--cpus", default="1", show_default=True, help="Number of vCPUs.")
@click.option("-m", "--memory", default="256M", show_default=True, help="Memory of the VM (e.g. 256M, 1G).")
@click.option("--vmm", default="auto", show_default=True, help="VMM backend: auto, qemu or firecracker.")
@click.option("-p", "--publish", multiple=True,
              help="Publish a port: [hostip:]hostport:guestport[/tcp|udp].")
@click.option("--network", "--net", "network", help="bridge (default) or none (no NIC at all).")
@click.option("--dns", multiple=True, help="Nameserver for the guest's /etc/resolv.conf (default: the host's).")
@click.option("--restart", "restart_policy", default="no", show_default=True,
              help="Restart policy: no, on-failure[:N], always or unless-stopped (the VM is rebooted).")
@click.option("--log-opt", "log_opts", multiple=True,
              help="Log driver option: max-size=SIZE (e.g. 10m) or max-file=N (json-file rotation).")
@click.option("--boot-timeout", default=60.0, show_default=True, help="Seconds to wait for the guest agent.")
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@security_options
@pass_ctx
def run(ctx: Context, security: SecurityOptions, detach: bool, interactive: bool, tty: bool, auto_remove: bool,
        name: str | None,
        env: tuple[str, ...], env_file: tuple[Path, ...], workdir: str | None, user: str | None, entrypoint: str | None,
        hostname: str | None, cpus: str, memory: str, vmm: str, publish: tuple[str, ...],
        network: str | None, dns: tuple[str, ...], restart_policy: str, log_opts: tuple[str, ...],
        boot_timeout: float, image: str, command: tuple[str, ...]) -> None:
    """Run a command in a new container, inside its own microVM."""
    from micropod.cli.interactive import check_tty_input
    from micropod.runconfig import RestartPolicy, parse_env_file, parse_log_opts
    from micropod.units import parse_cpus, parse_memory_mib

    check_tty_input(interactive and not detach, tty)
    policy = RestartPolicy.parse(restart_policy)
    if auto_remove and policy.name != "no":
        raise UsageError("conflicting options: --restart and --rm")
    variables = [item for path in env_file for item in parse_env_file(path)] + list(env)
    request = containers.RunRequest(
        image=image, args=command, name=name, auto_remove=auto_remove, env=variables, workdir=workdir,
        user=user, entrypoint=entrypoint, hostname=hostname, vcpus=parse_cpus(cpus),
        memory_mib=parse_memory_mib(memory), backend=vmm, boot_timeout=boot_timeout,
        stdin=interactive, tty=tty, log=parse_log_opts(log_opts), restart=policy,
        network=network, publish=publish, dns=dns, security=security,
    )
    cfg = containers.create(ctx, request)
    client = containers.start(ctx, cfg, attach=True)
    assert client is not None
    if detach:
        message = client.follow(until="started", timeout=boot_timeout + 60)
        client.close()
        if message["op"] == "exit":
            _fail_from_exit(message)
        click.echo(cfg.vm_id)
        return
    if interactive or tty:
        sys.exit(_attach_interactive(client, interactive, tty))
    sys.exit(_attach_foreground(client))


def _attach_interactive(client: Any, interactive: bool, tty: bool) -> int:
    from micropod.cli.interactive import session

    try:
        message = session(client, tty=tty, stdin=interactive, until=())
    finally:
        client.close()
    return _fail_from_exit(message) if message.get("error") else int(message.get("code", 125))


def _attach_foreground(client: Any) -> int:
    """Stream the container's output; forward SIGINT/SIGTERM to it as docker's --sig-proxy does."""
    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(MicropodError):
            client.request("signal", signal=signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    out, err = sys.stdout.buffer, sys.stderr.buffer

    def on_data(stream: int, data: bytes) -> None:
        target = out if stream == 1 else err
        target.write(data)
        target.flush()

    message = client.follow(on_data)
    client.close()
    return _fail_from_exit(message) if message.get("error") else int(message.get("code", 125))


def _fail_from_exit(message: dict[str, Any]) -> int:
    error = message.get("error") or "the container failed to start"
    click.echo(f"micropod: error: {error}", err=True)
    code = int(message.get("code") or 125)
    sys.exit(code)


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
@pass_ctx
def ps(ctx: Context, show_all: bool, quiet: bool, no_trunc: bool, fmt: str) -> None:
    """List containers."""
    from micropod.cli.output import json_lines, table, truncate
    from micropod.units import human_duration

    now = time.time()
    records = [r for r in reconcile(ctx) if show_all or r.status == "running"]
    if quiet:
        for record in records:
            click.echo(record.id if no_trunc else record.short_id)
        return
    if fmt == "json":
        json_lines([{
            "ID": record.id if no_trunc else record.short_id, "Image": record.image,
            "Command": _command_text(record), "CreatedAt": _iso(record.created),
            "State": record.status, "Status": _status_text(record, now), "Names": record.name,
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


def _ports(ctx: Context, record: VmRecord) -> str:
    """Like docker, only a running container shows its published ports."""
    from micropod.cli.network import load_settings, ports_column

    return ports_column(load_settings(ctx, record.id)) if record.status == "running" else ""


def _each(ctx: Context, idents: tuple[str, ...], action: Any, ignore_missing: bool = False) -> None:
    """Apply ``action`` to every container named; report each failure, fail at the end like docker."""
    failed = False
    for ident in idents:
        try:
            action(ctx.state.find(ident), ident)
        except NotFoundError:
            if ignore_missing:
                continue
            if ctx.debug:
                raise
            click.echo(f"micropod: error: No such container: {ident}", err=True)
            failed = True
        except MicropodError as exc:
            if ctx.debug:
                raise
            click.echo(f"micropod: error: {exc}", err=True)
            failed = True
    if failed:
        sys.exit(1)


@click.command()
@click.option("-t", "--time", "timeout", default=10, show_default=True, type=int,
              help="Seconds to wait before killing the VM.")
@click.option("-s", "--signal", "signal_name", help="Signal to send instead of the image's stop signal.")
@click.argument("containers_", metavar="CONTAINER...", nargs=-1, required=True)
@pass_ctx
def stop(ctx: Context, timeout: int, signal_name: str | None, containers_: tuple[str, ...]) -> None:
    """Stop running containers: their stop signal, then the VM is killed after the timeout."""
    if timeout < 0:
        raise UsageError("--time must not be negative")

    def action(record: VmRecord, ident: str) -> None:
        containers.stop(ctx, record, float(timeout), signal_name)
        click.echo(ident)

    _each(ctx, containers_, action)


@click.command()
@click.option("-s", "--signal", "signal_name", default="KILL", show_default=True, help="Signal to send.")
@click.argument("containers_", metavar="CONTAINER...", nargs=-1, required=True)
@pass_ctx
def kill(ctx: Context, signal_name: str, containers_: tuple[str, ...]) -> None:
    """Kill running containers (SIGKILL ends the whole VM)."""
    def action(record: VmRecord, ident: str) -> None:
        containers.kill(ctx, record, signal_name)
        click.echo(ident)

    _each(ctx, containers_, action)


@click.command()
@click.option("-f", "--force", is_flag=True, help="Kill running containers first; ignore missing ones.")
@click.argument("containers_", metavar="CONTAINER...", nargs=-1, required=True)
@pass_ctx
def rm(ctx: Context, force: bool, containers_: tuple[str, ...]) -> None:
    """Remove containers and everything they keep on the host."""
    reconcile(ctx)

    def action(record: VmRecord, ident: str) -> None:
        containers.remove(ctx, record, force)
        click.echo(ident)

    _each(ctx, containers_, action, ignore_missing=force)


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


@click.command()
@click.argument("containers_", metavar="CONTAINER...", nargs=-1, required=True)
@pass_ctx
def wait(ctx: Context, containers_: tuple[str, ...]) -> None:
    """Block until containers stop, then print their exit codes."""
    from micropod.monitorclient import MonitorClient

    for ident in containers_:
        record = ctx.state.find(ident)
        if containers.is_active(record):
            with contextlib.suppress(MicropodError):
                client = MonitorClient.connect(ctx.root.vm(record.id))
                client.request("wait")
                client.follow()
                client.close()
        final = reconcile(ctx) and ctx.state.get(record.id)
        click.echo(final.exit_code if final and final.exit_code is not None else -1)


def container_inspect(ctx: Context, record: VmRecord) -> dict[str, Any]:
    from micropod.cli.network import network_inspect
    from micropod.runconfig import NetworkSettings, RunConfig

    vm_dir = ctx.root.vm(record.id)
    cfg = RunConfig.load_if_readable(vm_dir.config)
    vmm = record.vmm
    network = network_inspect(cfg.network if cfg else NetworkSettings())
    return {
        "Id": record.id,
        "Created": _iso(record.created),
        "Path": record.argv[0] if record.argv else "",
        "Args": record.argv[1:],
        "State": {
            "Status": record.status,
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


@click.command()
@click.option("-a", "--attach", "attach_output", is_flag=True, help="Attach to the output and wait for the exit.")
@click.argument("containers_", metavar="CONTAINER...", nargs=-1, required=True)
@pass_ctx
def start(ctx: Context, attach_output: bool, containers_: tuple[str, ...]) -> None:
    """Start stopped containers: each VM boots again with its writable layer kept."""
    reconcile(ctx)
    if attach_output and len(containers_) != 1:
        raise UsageError("you cannot start and attach multiple containers at once")

    def action(record: VmRecord, ident: str) -> None:
        client = containers.start_existing(ctx, record)
        if attach_output:
            sys.exit(_attach_foreground(client))
        message = client.follow(until="started", timeout=record_timeout(ctx, record))
        client.close()
        if message["op"] == "exit":
            raise MicropodError(message.get("error") or f"container {ident} exited at once "
                                f"with code {message.get('code')}")
        click.echo(ident)

    _each(ctx, containers_, action)


def record_timeout(ctx: Context, record: VmRecord) -> float:
    from micropod.runconfig import RunConfig

    return RunConfig.load(ctx.root.vm(record.id).config).boot_timeout + 60


@click.command()
@click.option("-t", "--time", "timeout", default=10, show_default=True, type=int,
              help="Seconds to wait before killing the VM.")
@click.argument("containers_", metavar="CONTAINER...", nargs=-1, required=True)
@pass_ctx
def restart(ctx: Context, timeout: int, containers_: tuple[str, ...]) -> None:
    """Restart containers: stop (as `stop -t`), then boot the VM again with its writable layer kept."""
    if timeout < 0:
        raise UsageError("--time must not be negative")

    def action(record: VmRecord, ident: str) -> None:
        containers.stop(ctx, record, float(timeout))
        fresh = reconcile(ctx) and ctx.state.find(record.id)
        assert fresh
        client = containers.start_existing(ctx, fresh)
        message = client.follow(until="started", timeout=record_timeout(ctx, record))
        client.close()
        if message["op"] == "exit":
            raise MicropodError(message.get("error") or f"container {ident} exited at once")
        click.echo(ident)

    _each(ctx, containers_, action)


COMMANDS = [run, start, restart, ps, stop, kill, rm, logs, wait]
