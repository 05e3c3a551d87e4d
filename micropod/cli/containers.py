"""Container commands that act on containers: run, start, restart, stop, kill, rm, wait."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from micropod.cli.mounts import mount_options, requested_mounts
from micropod.cli.security import security_options
from micropod.context import Context
from micropod.errors import MicropodError, NotFoundError, UsageError
from micropod.monitor.api import Op
from micropod.quotas import Quotas
from micropod.runconfig import SecurityOptions
from micropod.service import containers
from micropod.service.reconcile import reconcile
from micropod.state import VmRecord

pass_ctx = click.make_pass_decorator(Context)


_CONTAINER_OPTIONS: list[Callable[[Any], Any]] = [
    click.option("-i", "--interactive", is_flag=True, help="Keep STDIN open and forward it to the container."),
    click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-TTY for the container's process."),
    click.option("--rm", "auto_remove", is_flag=True, help="Remove the container when it exits."),
    click.option("--name", help="Assign a name to the container."),
    click.option("-e", "--env", multiple=True, help="Set an environment variable (KEY=VALUE, or KEY)."),
    click.option("--env-file", multiple=True, type=click.Path(path_type=Path), help="Read variables from a file."),
    click.option("-w", "--workdir", help="Working directory inside the container."),
    click.option("-u", "--user", help="User name or uid[:gid] to run as."),
    click.option("--entrypoint", help="Override the image's entrypoint."),
    click.option("-h", "--hostname", help="Container host name (default: the short id)."),
    click.option("--cpus", default="1", show_default=True, help="Number of vCPUs."),
    click.option("-m", "--memory", default="256M", show_default=True, help="Memory of the VM (e.g. 256M, 1G)."),
    click.option("--vmm", default="auto", show_default=True, help="VMM backend: auto, qemu or firecracker."),
    click.option("-p", "--publish", multiple=True, help="Publish a port: [hostip:]hostport:guestport[/tcp|udp]."),
    click.option("--network", "--net", "network", help="bridge (default) or none (no NIC at all)."),
    click.option("--dns", multiple=True, help="Nameserver for the guest's /etc/resolv.conf (default: the host's)."),
    click.option("--restart", "restart_policy", default="no", show_default=True,
                 help="Restart policy: no, on-failure[:N], always or unless-stopped (the VM is rebooted)."),
    click.option("--log-opt", "log_opts", multiple=True,
                 help="Log driver option: max-size=SIZE (e.g. 10m) or max-file=N (json-file rotation)."),
    click.option("--boot-timeout", default=60.0, show_default=True, help="Seconds to wait for the guest agent."),
    click.option("--pids-limit", type=int, default=0, help="At most this many processes in the container (0: none)."),
    click.option("--storage-opt", "storage_opts", multiple=True,
                 help="size=SIZE: the writable layer's size (default 10G, sparse)."),
    click.option("--cpu-shares", type=int, default=0, help="The VMM's CPU weight against other VMs (1024 default)."),
    click.option("--cpuset-cpus", default="", help="Host CPUs the VMM may run on (0-1,3)."),
    click.option("--memory-reservation", default="", help="The VMM's soft memory limit (e.g. 128M)."),
    click.option("--device-read-bps", multiple=True, help="[PATH:]RATE: reads of the container's disks (5m)."),
    click.option("--device-write-bps", multiple=True, help="[PATH:]RATE: writes to the container's disks (5m)."),
    click.option("--device-read-iops", multiple=True, help="[PATH:]N: read operations per second."),
    click.option("--device-write-iops", multiple=True, help="[PATH:]N: write operations per second."),
    click.option("--network-rate", default="", help="Bytes per second each way on the VM's NIC (e.g. 10m)."),
    click.option("-l", "--label", "labels", multiple=True, metavar="KEY=VALUE", help="A label of the container."),
    click.option("--sysctl", "sysctls", multiple=True, metavar="KEY=VALUE",
                 help="A namespaced kernel parameter in the VM (net.*, kernel.shm*, kernel.msg*, fs.mqueue.*)."),
    click.option("--metadata", multiple=True, metavar="KEY=VALUE",
                 help="What the VM's metadata service serves under /latest/user-data/KEY."),
    click.option("--metadata-file", type=click.Path(dir_okay=False),
                 help="A JSON object for /latest/user-data (--metadata pairs go over it)."),
    click.option("--pod", help="Run in this pod's VM (see `micropod pod create`); --cpus and --memory then limit "
                               "the container's cgroup."),
    click.argument("image"),
    click.argument("command", nargs=-1, type=click.UNPROCESSED),
    security_options,
    mount_options,
    pass_ctx,
]


def container_options(command: Any) -> Any:
    """run's and create's options: docker's, for what the container and its VM will be."""
    for option in reversed(_CONTAINER_OPTIONS):
        command = option(command)
    return command


def _run_request(security: SecurityOptions, options: dict[str, Any]) -> containers.RunRequest:
    from micropod.cli.volumes import key_values
    from micropod.metadata.tree import user_data
    from micropod.runconfig import RestartPolicy, parse_env_file, parse_log_opts
    from micropod.units import parse_cpus, parse_memory_mib

    policy = RestartPolicy.parse(options["restart_policy"])
    if options["auto_remove"] and policy.name != "no":
        raise UsageError("conflicting options: --restart and --rm")
    mounts = requested_mounts()
    variables = [item for path in options["env_file"] for item in parse_env_file(path)] + list(options["env"])
    return containers.RunRequest(
        image=options["image"], args=options["command"], name=options["name"], auto_remove=options["auto_remove"],
        env=variables, workdir=options["workdir"], user=options["user"], entrypoint=options["entrypoint"],
        hostname=options["hostname"], vcpus=parse_cpus(options["cpus"]), cpu_limit=float(options["cpus"]),
        memory_mib=parse_memory_mib(options["memory"]), backend=options["vmm"],
        boot_timeout=options["boot_timeout"], stdin=options["interactive"], tty=options["tty"],
        log=parse_log_opts(options["log_opts"]), restart=policy, network=options["network"],
        publish=options["publish"], dns=options["dns"], security=security, volumes=tuple(mounts.volumes),
        tmpfs=tuple(mounts.tmpfs), read_only=mounts.read_only, binds=tuple(mounts.binds),
        devices=tuple(mounts.devices),
        pids_limit=_pids_limit(options["pids_limit"]), upper_size=_storage_size(options["storage_opts"]),
        pod=options["pod"], quotas=quotas_of(options), **_pod_limits(options),
        user_data=user_data(options["metadata"], options["metadata_file"]),
        labels=key_values(options["labels"], "--label"), sysctls=key_values(options["sysctls"], "--sysctl"),
    )


def quotas_of(options: dict[str, Any]) -> Quotas:
    """run's, create's and update's quota flags."""
    from micropod.quotas import parse_cpu_shares, parse_cpuset, parse_disk_rates, parse_rate
    from micropod.units import parse_memory_mib

    flags = {f"--{name.replace('_', '-')}": tuple(options.get(name) or ())
             for name in ("device_read_bps", "device_write_bps", "device_read_iops", "device_write_iops")}
    reservation = options.get("memory_reservation") or ""
    rate = options.get("network_rate") or ""
    return Quotas(
        cpu_shares=parse_cpu_shares(options.get("cpu_shares") or 0),
        cpuset_cpus=parse_cpuset(options.get("cpuset_cpus") or ""),
        memory_reservation_mib=parse_memory_mib(reservation) if reservation else 0,
        disk_rates=parse_disk_rates(flags),
        network_rate=parse_rate(rate, "--network-rate") if rate else 0,
    )


def _pod_limits(options: dict[str, Any]) -> dict[str, Any]:
    """In a pod, the pod's values size the VM: a container's own --memory and --cpus, when given, limit its
    cgroup inside it."""
    from micropod.units import parse_memory_mib

    if options["pod"] is None:
        return {}
    given = click.get_current_context().get_parameter_source
    limits: dict[str, Any] = {}
    if given("memory") == click.core.ParameterSource.COMMANDLINE:
        limits["memory_limit"] = parse_memory_mib(options["memory"]) << 20
    if given("cpus") == click.core.ParameterSource.COMMANDLINE:
        try:
            limits["cpu_quota"] = float(options["cpus"])
        except ValueError:
            raise UsageError(f"invalid --cpus {options['cpus']!r}") from None
    return limits


def _pids_limit(limit: int) -> int:
    if limit < -1:
        raise UsageError(f"invalid --pids-limit {limit}: use a count, or 0 or -1 for none")
    return max(limit, 0)


def _storage_size(opts: tuple[str, ...]) -> int | None:
    from micropod.rootfs.upper import MIN_UPPER_SIZE
    from micropod.units import parse_size

    size = None
    for opt in opts:
        key, sep, value = opt.partition("=")
        if key != "size" or not sep:
            raise UsageError(f"invalid --storage-opt {opt!r}: micropod takes size=SIZE")
        size = parse_size(value)
        if size < MIN_UPPER_SIZE:
            raise UsageError(f"invalid --storage-opt {opt!r}: the writable layer needs at least "
                             f"{MIN_UPPER_SIZE >> 20} MiB")
    return size


@click.command(context_settings={"ignore_unknown_options": False, "allow_interspersed_args": False})
@click.option("-d", "--detach", is_flag=True, help="Run in the background and print the container id.")
@container_options
def run(ctx: Context, security: SecurityOptions, detach: bool, **options: Any) -> None:
    """Run a command in a new container, inside its own microVM."""
    from micropod.cli.interactive import check_tty_input

    interactive, tty = options["interactive"], options["tty"]
    check_tty_input(interactive and not detach, tty)
    cfg = containers.create(ctx, _run_request(security, options))
    try:
        client = containers.start(ctx, cfg, attach=True)
    except MicropodError:
        if options["pod"]:
            containers.discard(ctx, cfg.vm_id)
        raise
    assert client is not None
    if options["pod"]:
        # Added to a running VM: a container that never started is not left behind, and its output follows.
        ended = containers.await_start(client, options["boot_timeout"] + 60)
        if ended is not None:
            client.close()
            containers.discard(ctx, cfg.vm_id)
            _fail_from_exit(ended)
        if detach:
            client.close()
            click.echo(cfg.vm_id)
            return
    elif detach:
        ended = containers.wait_started(client, options["boot_timeout"] + 60)
        if ended is not None:
            _fail_from_exit(ended)
        click.echo(cfg.vm_id)
        return
    if interactive or tty:
        sys.exit(_attach_interactive(client, interactive, tty))
    sys.exit(_attach_foreground(client))


@click.command(context_settings={"ignore_unknown_options": False, "allow_interspersed_args": False})
@container_options
def create(ctx: Context, security: SecurityOptions, **options: Any) -> None:
    """Create a container (its disks and config, no VM yet) and print its id; `start` boots it."""
    cfg = containers.create(ctx, _run_request(security, options), configured_only=True)
    click.echo(cfg.vm_id)


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
            client.request(Op.SIGNAL, signal=signum)

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



def each_container(ctx: Context, idents: tuple[str, ...], action: Any, ignore_missing: bool = False) -> None:
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

    each_container(ctx, containers_, action)


@click.command()
@click.option("-s", "--signal", "signal_name", default="KILL", show_default=True, help="Signal to send.")
@click.argument("containers_", metavar="CONTAINER...", nargs=-1, required=True)
@pass_ctx
def kill(ctx: Context, signal_name: str, containers_: tuple[str, ...]) -> None:
    """Kill running containers (SIGKILL ends the whole VM)."""
    def action(record: VmRecord, ident: str) -> None:
        containers.kill(ctx, record, signal_name)
        click.echo(ident)

    each_container(ctx, containers_, action)


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

    each_container(ctx, containers_, action, ignore_missing=force)



@click.command()
@click.argument("containers_", metavar="CONTAINER...", nargs=-1, required=True)
@pass_ctx
def wait(ctx: Context, containers_: tuple[str, ...]) -> None:
    """Block until containers stop, then print their exit codes."""
    from micropod.monitor.client import MonitorClient

    for ident in containers_:
        record = ctx.state.find(ident)
        if containers.is_active(record):
            with contextlib.suppress(MicropodError):
                client = MonitorClient.of(ctx.root, record)
                client.request(Op.WAIT)
                client.follow()
                client.close()
        final = reconcile(ctx) and ctx.state.get(record.id)
        click.echo(final.exit_code if final and final.exit_code is not None else -1)



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
        _started(client, ctx, record, ident)

    each_container(ctx, containers_, action)


def _started(client: Any, ctx: Context, record: VmRecord, ident: str) -> None:
    ended = containers.wait_started(client, record_timeout(ctx, record))
    if ended is not None:
        raise MicropodError(ended.get("error") or f"container {ident} exited at once with code {ended.get('code')}")
    click.echo(ident)


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
        _started(client, ctx, record, ident)

    each_container(ctx, containers_, action)


COMMANDS = [run, create, start, restart, stop, kill, rm, wait]
