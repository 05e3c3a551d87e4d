"""podman's pod commands: a pod is one microVM that holds several containers (micropod/service/pods.py)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import click

from micropod.cli.output import json_document, json_lines, table
from micropod.context import Context
from micropod.errors import MicropodError, UsageError
from micropod.state.pods import PodRecord

pass_ctx = click.make_pass_decorator(Context)


@click.group()
def pod() -> None:
    """Manage pods: groups of containers that share one microVM and its network."""


@pod.command("create")
@click.option("--name", help="The pod's name (default: a generated one).")
@click.option("-p", "--publish", multiple=True, help="Publish a port of the pod: [hostip:]hostport:guestport.")
@click.option("--cpus", default="1", show_default=True, help="vCPUs of the pod's VM.")
@click.option("-m", "--memory", default="512M", show_default=True, help="Memory of the pod's VM.")
@click.option("--hostname", help="The pod's host name (default: its name).")
@click.option("--dns", multiple=True, help="Nameserver for the containers' /etc/resolv.conf.")
@click.option("--network", "--net", "network", help="bridge (default) or none.")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE")
@click.option("--vmm", default="auto", show_default=True, help="VMM backend: auto, qemu or firecracker.")
@click.option("--drive-pool", "pool", default=4, show_default=True, type=int,
              help="Read-only and writable drives kept for containers added to the running VM.")
@click.option("--boot-timeout", default=60.0, show_default=True, help="Seconds to wait for the guest agent.")
@pass_ctx
def create(ctx: Context, name: str | None, publish: tuple[str, ...], cpus: str, memory: str,
           hostname: str | None, dns: tuple[str, ...], network: str | None, labels: tuple[str, ...], vmm: str,
           pool: int, boot_timeout: float) -> None:
    """Create a pod (its VM boots on `pod start`, or with its first container) and print its id."""
    from micropod.cli.volumes import key_values
    from micropod.service import pods
    from micropod.units import parse_cpus, parse_memory_mib

    request = pods.PodRequest(
        name=name, publish=publish, vcpus=parse_cpus(cpus), cpu_limit=float(cpus),
        memory_mib=parse_memory_mib(memory), hostname=hostname, dns=dns, network=network,
        labels=key_values(labels, "--label"), backend=vmm, pool=pool, boot_timeout=boot_timeout,
    )
    click.echo(pods.create(ctx, request).pod_id)


def _each(ctx: Context, idents: tuple[str, ...], action: Callable[[PodRecord], None],
          ignore_missing: bool = False) -> None:
    """``action`` on every pod named, each failure reported in one line, and a failing exit at the end."""
    from micropod.errors import NotFoundError
    from micropod.service.reconcile import reconcile

    reconcile(ctx)
    failed = False
    for ident in idents:
        try:
            record = ctx.pods.find(ident)
            action(record)
            click.echo(record.id)
        except NotFoundError as exc:
            if ignore_missing:
                continue
            failed = _report(ctx, exc)
        except MicropodError as exc:
            failed = _report(ctx, exc)
    if failed:
        sys.exit(1)


def _report(ctx: Context, exc: MicropodError) -> bool:
    if ctx.debug:
        raise exc
    click.echo(f"micropod: error: {exc}", err=True)
    return True


@pod.command("start")
@click.argument("pods_", metavar="POD...", nargs=-1, required=True)
@pass_ctx
def start(ctx: Context, pods_: tuple[str, ...]) -> None:
    """Boot pods' VMs and start their containers."""
    from micropod.service import pods

    _each(ctx, pods_, lambda record: pods.start(ctx, record))


@pod.command("stop")
@click.option("-t", "--time", "timeout", default=10, show_default=True, type=int,
              help="Seconds to wait for the containers before killing them.")
@click.argument("pods_", metavar="POD...", nargs=-1, required=True)
@pass_ctx
def stop(ctx: Context, timeout: int, pods_: tuple[str, ...]) -> None:
    """Stop every container of the pods, then power their VMs off."""
    from micropod.service import pods

    if timeout < 0:
        raise UsageError("--time must not be negative")
    _each(ctx, pods_, lambda record: pods.stop(ctx, record, float(timeout)))


@pod.command("restart")
@click.option("-t", "--time", "timeout", default=10, show_default=True, type=int)
@click.argument("pods_", metavar="POD...", nargs=-1, required=True)
@pass_ctx
def restart(ctx: Context, timeout: int, pods_: tuple[str, ...]) -> None:
    """Stop the pods, then start them again with their containers."""
    from micropod.service import pods

    def again(record: PodRecord) -> None:
        pods.stop(ctx, record, float(timeout))
        fresh = ctx.pods.get(record.id)
        assert fresh is not None
        pods.start(ctx, fresh)

    _each(ctx, pods_, again)


@pod.command("kill")
@click.argument("pods_", metavar="POD...", nargs=-1, required=True)
@pass_ctx
def kill(ctx: Context, pods_: tuple[str, ...]) -> None:
    """Kill the pods' VMs at once."""
    from micropod.service import pods

    _each(ctx, pods_, lambda record: pods.kill(ctx, record))


@pod.command("rm")
@click.option("-f", "--force", is_flag=True, help="Kill running pods first; ignore missing ones.")
@click.argument("pods_", metavar="POD...", nargs=-1, required=True)
@pass_ctx
def rm(ctx: Context, force: bool, pods_: tuple[str, ...]) -> None:
    """Remove pods, their containers and everything they keep on the host."""
    from micropod.service import pods

    _each(ctx, pods_, lambda record: pods.remove(ctx, record, force), ignore_missing=force)


@pod.command("ps")
@click.option("-q", "--quiet", is_flag=True, help="Only the ids.")
@click.option("--no-trunc", is_flag=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@pass_ctx
def ps(ctx: Context, quiet: bool, no_trunc: bool, fmt: str) -> None:
    """List pods, with their containers and labels."""
    from micropod.service.pod_views import summaries

    found = summaries(ctx)
    if quiet:
        for item in found:
            click.echo(item["Id"] if no_trunc else item["Id"][:12])
    elif fmt == "json":
        json_lines(found)
    else:
        from micropod.units import human_duration

        now = time.time()
        table(["POD ID", "NAME", "STATUS", "CREATED", "# OF CONTAINERS"],
              [[item["Id"] if no_trunc else item["Id"][:12], item["Name"], item["Status"].capitalize(),
                f"{human_duration(now - item['CreatedAt'])} ago", str(item["NumberOfContainers"])]
               for item in found])


@pod.command("inspect")
@click.argument("pods_", metavar="POD...", nargs=-1, required=True)
@pass_ctx
def inspect(ctx: Context, pods_: tuple[str, ...]) -> None:
    """Everything about pods, as JSON."""
    from micropod.service.pod_views import inspect as inspect_pod

    json_document([inspect_pod(ctx, ctx.pods.find(ident)) for ident in pods_])


@pod.command("logs")
@click.option("-t", "--timestamps", is_flag=True, help="Show timestamps.")
@click.option("-n", "--tail", default="all", help="Lines to show from the end of each container's log.")
@click.option("-c", "--container", help="Only this container's log.")
@click.argument("pod_", metavar="POD")
@pass_ctx
def logs(ctx: Context, timestamps: bool, tail: str, container: str | None, pod_: str) -> None:
    """The output of the pod's containers, in time order, each line after its container's name."""
    from micropod.service.pod_views import merged_logs

    if tail != "all" and not tail.isdigit():
        raise UsageError(f"invalid --tail {tail!r}: a number or 'all'")
    record = ctx.pods.find(pod_)
    for name, entry in merged_logs(ctx, record, None if tail == "all" else int(tail), container):
        target: Any = sys.stdout.buffer if entry.stream == "stdout" else sys.stderr.buffer
        stamp = entry.time.encode() + b" " if timestamps else b""
        target.write(name.encode() + b" " + stamp + entry.data)
        target.flush()


COMMANDS = [pod]
