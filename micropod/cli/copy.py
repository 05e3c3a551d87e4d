"""`cp` between the host and a container, as tar streams through its monitor and agent.

A stopped container's VM is booted for the copy in maintenance mode (its disks mounted by the agent as
for a run, no process started) and powered off cleanly afterwards, so the overlay is read and written
exactly as the container sees it.

`micropod cp C:/path DEST` and `micropod cp SRC C:/path` follow docker's rules: into an existing
directory the copy keeps its name, otherwise it takes the destination's. Paths inside the container
are resolved within its root by the agent (see micropod/agent/archive.py).

The guest is untrusted, and so is the tar it sends: it is unpacked as it streams in, never spooled,
beneath an open fd of the destination directory without following any link (micropod/agent/beneath.py,
which the agent uses for ``cp`` in too). Files are the invoking user's unless ``-a`` keeps the tar's
owners; setuid and setgid bits are dropped, and devices, fifos and sockets are skipped with a warning.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from micropod import wire
from micropod.agent.beneath import TarError, Untar
from micropod.context import Context
from micropod.errors import ConflictError, MicropodError, NotFoundError, UsageError, printable
from micropod.monitor.api import Op
from micropod.monitor.client import MonitorClient
from micropod.service.reconcile import reconcile
from micropod.state import VmRecord

pass_ctx = click.make_pass_decorator(Context)


def split_container_path(arg: str) -> tuple[str, str] | None:
    """``C:/path`` -> (C, /path); a host path (with no colon before its first slash) -> None."""
    head, sep, tail = arg.partition(":")
    if not sep or "/" in head or not head:
        return None
    return head, tail or "/"


@contextlib.contextmanager
def connected(ctx: Context, ident: str) -> Iterator[MonitorClient]:
    """The monitor of a running container, or a stopped one's VM booted for the copy and powered off after."""
    reconcile(ctx)
    record = ctx.state.find(ident)
    if record.pod and record.status != "running":
        # A pod's container that does not run: its pod's VM (booted if it is down) mounts its disks for the copy.
        from micropod.service import pods

        pod = ctx.pods.get(record.pod)
        if pod is None:
            raise ConflictError(f"the pod of container {record.name} no longer exists")
        pods.boot(ctx, pod)
    if record.status == "running" or record.pod:
        try:
            client = MonitorClient.of(ctx.root, record)
        except MicropodError:
            raise ConflictError(f"container {record.name} is not running") from None
        try:
            yield client
        finally:
            client.close()
        return
    with maintenance(ctx, record) as client:
        yield client


@contextlib.contextmanager
def maintenance(ctx: Context, record: VmRecord) -> Iterator[MonitorClient]:
    """Boot a stopped container's VM with its disks mounted and nothing started; its record shows
    "created" meanwhile (so start and rm wait), and gets its old status back afterwards."""
    from micropod.runconfig import RunConfig
    from micropod.service import containers

    if record.status not in ("exited", "dead"):
        raise ConflictError(f"container {record.name} is {record.status}; try again once it has started")
    cfg = RunConfig.load(ctx.root.vm(record.id).config)
    if not ctx.state.update_if(record.id, ("exited", "dead"), status="created"):
        raise ConflictError(f"container {record.name} is being started or removed by another command")
    client: MonitorClient | None = None
    try:
        client = containers.start(ctx, cfg, attach=True, maintenance=True)
        assert client is not None
        message = client.follow(until=Op.STARTED, timeout=cfg.boot_timeout + 60)
        if message["op"] != Op.STARTED:
            raise MicropodError(message.get("error") or "the stopped container's VM did not boot for the copy")
        try:
            yield client
        finally:
            # Also after a failed copy: the VM booted for it must not stay up.
            with contextlib.suppress(MicropodError, OSError):
                client.request(Op.SHUTDOWN)
                client.follow(timeout=containers.STOP_GRACE)
    finally:
        if client is not None:
            client.close()
        ctx.state.update_if(record.id, ("created",), status=record.status, exit_code=record.exit_code,
                            error=record.error, finished=record.finished)


def _finish(message: dict[str, Any]) -> None:
    if message["op"] == Op.ERROR:  # the monitor refused the copy
        raise MicropodError(printable(str(message.get("message"))))
    if message["op"] == Op.EXIT:
        raise ConflictError("the container stopped during the copy")
    if message.get("error") or int(message.get("code", 1)) != 0:
        raise MicropodError(str(message.get("error") or "the copy failed"))


def copy_out(ctx: Context, ident: str, path: str, dest: Path, archive: bool = False) -> None:
    """Unpack the container's tar of ``path`` as it streams in, beneath an fd of the destination
    directory (see micropod/agent/beneath.py for the rules that keep it there)."""
    if dest.is_dir():
        where, top = dest, posixpath.basename(path.rstrip("/"))
    else:
        where, top = dest.parent, dest.name
        if not where.is_dir():
            raise NotFoundError(f"destination directory {where} does not exist")
    try:
        dirfd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise MicropodError(f"cannot open the destination directory {where}: {exc.strerror}") from None
    # The host, not the guest's tar, names the top: "" (a copy of "/" or ".") puts the contents in place.
    untar = Untar(dirfd, top if top not in (".", "..") else "", keep_owner=archive)
    try:
        def sink(stream: int, data: bytes) -> None:
            if stream == wire.STDOUT:
                untar.feed(data)

        with connected(ctx, ident) as client:
            client.request(Op.CP_GET, path=path)
            message = client.interact(sink, until=(Op.EXEC_EXIT, Op.ERROR))
        if untar.error is None:
            _finish(message)
        try:
            untar.close()
        except TarError as exc:
            raise MicropodError(f"copy from {ident}:{path} stopped: {exc}") from None
    finally:
        untar.extractor.abort()
        os.close(dirfd)
    _warn_skipped(untar.skipped)


def _warn_skipped(skipped: list[str]) -> None:
    if skipped:
        click.echo(f"warning: skipped {len(skipped)} device node(s), fifo(s), socket(s) or unknown member(s), "
                   f"such as {printable(skipped[0])!r}: cp copies files, directories and links", err=True)


def copy_in(ctx: Context, src: Path, ident: str, path: str, archive: bool = False) -> None:
    """Pack ``src`` as it is (links as links, nothing outside it followed) and stream it in. The agent
    takes the tar's owners, so that without ``-a`` they are root, as docker makes them."""
    if not src.exists() and not src.is_symlink():
        raise NotFoundError(f"could not find the file {src} on the host")
    skipped: list[str] = []

    def only_copyable(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if not (info.isreg() or info.isdir() or info.issym() or info.islnk()):
            skipped.append(info.name)
            return None
        info.mode &= 0o1777 if info.isdir() else 0o777
        if not archive:
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
        return info

    with connected(ctx, ident) as client:
        client.request(Op.CP_PUT, path=path)
        message = client.interact(lambda *_: None, until=(Op.EXEC_STARTED, Op.EXEC_EXIT, Op.ERROR))
        if message["op"] == Op.EXEC_STARTED:
            writer = _StdinWriter(client)
            with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                name = src.name if src.name not in ("", ".", "..") else src.resolve().name
                tar.add(src, arcname=name, filter=only_copyable)
            client.channel.send_eof(0)
            message = client.interact(lambda *_: None, until=(Op.EXEC_EXIT,))
    _finish(message)
    _warn_skipped(skipped)


class _StdinWriter:
    def __init__(self, client: MonitorClient) -> None:
        self.client = client

    def write(self, data: bytes) -> int:
        if data:
            self.client.channel.send_data(0, bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


@click.command()
@click.option("-a", "--archive", is_flag=True, help="Keep the files' owners (uid and gid) from the source")
@click.argument("source")
@click.argument("destination")
@pass_ctx
def cp(ctx: Context, archive: bool, source: str, destination: str) -> None:
    """Copy files between a container (running or stopped) and the host (C:/path DEST, or SRC C:/path)."""
    src, dst = split_container_path(source), split_container_path(destination)
    if src and dst:
        raise UsageError("copying between containers is not supported")
    if not src and not dst:
        raise UsageError("one of the paths must name a container: CONTAINER:PATH")
    if src:
        if destination == "-":
            raise UsageError("copying to stdout (-) is not supported yet")
        copy_out(ctx, src[0], src[1], Path(destination), archive)
    elif dst:
        if source == "-":
            raise UsageError("copying from stdin (-) is not supported yet")
        copy_in(ctx, Path(source), dst[0], dst[1], archive)
    sys.stdout.flush()


COMMANDS = [cp]
