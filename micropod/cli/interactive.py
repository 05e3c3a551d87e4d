"""Commands that connect a terminal to a container's processes: exec and attach (and run -i/-t's loop).

With a TTY the local terminal goes to raw mode, so ^C and every other key reach the process as bytes;
its window size is sent at the start and on each SIGWINCH, and the terminal is restored at the end.
Without one, SIGINT/SIGTERM/SIGHUP are forwarded to the process, like docker's --sig-proxy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import click

from micropod.context import Context
from micropod.errors import ConflictError, MicropodError, UsageError, printable
from micropod.monitor.api import Op
from micropod.monitor.client import MonitorClient

pass_ctx = click.make_pass_decorator(Context)

DETACH_KEYS = b"\x10\x11"  # Ctrl-P Ctrl-Q
PROXIED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def window_size(fd: int) -> tuple[int, int] | None:
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    return size.lines, size.columns


@contextlib.contextmanager
def raw_terminal(fd: int | None) -> Iterator[None]:
    """Raw mode for ``fd`` when it is a terminal; restored whatever happens."""
    import termios
    import tty

    if fd is None or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def signal_wakeup(signums: tuple[int, ...]) -> Iterator[int]:
    """A pipe that receives the numbers of ``signums`` as they arrive, for a select loop."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    previous = {signum: signal.signal(signum, lambda *_: None) for signum in signums}
    old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    try:
        yield read_fd
    finally:
        signal.set_wakeup_fd(old_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(read_fd)
        os.close(write_fd)


def session(client: MonitorClient, *, tty: bool, stdin: bool, until: tuple[str, ...],
            detach_keys: bytes | None = None, send_size: bool = True, proxy: bool = True) -> dict[str, Any]:
    """Relay a process's output (and our stdin) until a message in ``until`` or the VM's exit."""
    out, err = sys.stdout.buffer, sys.stderr.buffer
    in_fd = sys.stdin.fileno() if stdin else None

    def on_data(stream: int, data: bytes) -> None:
        target = err if stream == 2 else out
        target.write(data)
        target.flush()

    def resize() -> None:
        size = window_size(in_fd if in_fd is not None else sys.stdout.fileno())
        if size is not None:
            with contextlib.suppress(MicropodError):
                client.request(Op.RESIZE, rows=size[0], cols=size[1])

    def on_wakeup(data: bytes) -> None:
        for signum in set(data):
            if signum == signal.SIGWINCH:
                resize()
            elif not tty and proxy:
                with contextlib.suppress(MicropodError):
                    client.request(Op.SIGNAL, signal=signum)

    signums = (signal.SIGWINCH,) if tty else PROXIED
    with signal_wakeup(signums) as wakeup, raw_terminal(in_fd if tty else None):
        if tty and send_size:
            resize()
        return client.interact(on_data, until, stdin=in_fd, wakeup=wakeup, on_wakeup=on_wakeup,
                               detach_keys=detach_keys if tty else None)


def _exec_env(items: tuple[str, ...]) -> list[str]:
    env = []
    for item in items:
        key, sep, _ = item.partition("=")
        if not key or any(c.isspace() for c in key):
            raise UsageError(f"invalid environment variable {item!r}: use KEY=VALUE")
        if sep:
            env.append(item)
        elif key in os.environ:
            env.append(f"{key}={os.environ[key]}")
    return env


def check_tty_input(interactive: bool, tty: bool) -> None:
    if interactive and tty and not os.isatty(sys.stdin.fileno()):
        raise UsageError("the input device is not a TTY")


@click.command(name="exec", context_settings={"allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Keep STDIN open and forward it.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-TTY.")
@click.option("-d", "--detach", is_flag=True, help="Run the command in the background.")
@click.option("-e", "--env", multiple=True, help="Set an environment variable (KEY=VALUE, or KEY).")
@click.option("-u", "--user", help="User name or uid[:gid] to run as.")
@click.option("-w", "--workdir", help="Working directory inside the container.")
@click.argument("container")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_ctx
def exec_(ctx: Context, interactive: bool, tty: bool, detach: bool, env: tuple[str, ...], user: str | None,
          workdir: str | None, container: str, command: tuple[str, ...]) -> None:
    """Run a command in a running container."""
    check_tty_input(interactive and not detach, tty)
    record = ctx.state.find(container)
    if record.status != "running":
        raise ConflictError(f"container {record.id} is not running")
    spec: dict[str, Any] = {"args": list(command), "env": _exec_env(env), "user": user or "",
                            "cwd": workdir or "", "tty": tty, "stdin": interactive and not detach}
    size = window_size(sys.stdin.fileno()) if tty else None
    if size is not None:
        spec["rows"], spec["cols"] = size
    try:
        client = MonitorClient.of(ctx.root, record)
    except MicropodError:
        raise ConflictError(f"container {record.id} is not running") from None
    try:
        client.request(Op.EXEC, spec=spec, detach=detach)
        # ERROR: the monitor refused the exec (it is stopping the VM, say); waiting on would wait for the VM.
        message = client.interact(lambda *_: None, until=(Op.EXEC_STARTED, Op.EXEC_EXIT, Op.ERROR))
        if message["op"] == Op.EXEC_STARTED and not detach:
            message = session(client, tty=tty, stdin=interactive, until=(Op.EXEC_EXIT,), send_size=False)
    finally:
        client.close()
    sys.exit(_exit_code(message, record.id))


def _exit_code(message: dict[str, Any], vm_id: str) -> int:
    op = message["op"]
    if op in (Op.EXEC_STARTED, Op.DETACHED):
        return 0
    if op == Op.ERROR:
        click.echo(f"micropod: error: {printable(str(message.get('message')))}", err=True)
        return 125
    if op == Op.EXIT:  # the VM ended under the exec
        if message.get("error") is None and int(message.get("code", 0)) == 0:
            return 137
        click.echo(f"micropod: error: container {vm_id} stopped", err=True)
        return 137
    if message.get("error"):
        click.echo(f"micropod: error: {printable(str(message['error']))}", err=True)  # the guest's words
    return int(message.get("code", 125))


@click.command()
@click.option("--no-stdin", is_flag=True, help="Do not attach STDIN.")
@click.option("--sig-proxy/--no-sig-proxy", default=True, help="Proxy received signals to the process.")
@click.argument("container")
@pass_ctx
def attach(ctx: Context, no_stdin: bool, sig_proxy: bool, container: str) -> None:
    """Attach to a running container's main process (Ctrl-P Ctrl-Q detaches with a TTY)."""
    from micropod.runconfig import RunConfig

    record = ctx.state.find(container)
    if record.status != "running":
        raise ConflictError(f"You cannot attach to a stopped container, start it first ({record.name})")
    cfg = RunConfig.load(ctx.root.vm(record.id).config)
    try:
        client = MonitorClient.of(ctx.root, record)
    except MicropodError:
        raise ConflictError(f"container {record.id} is not running") from None
    stdin = cfg.container.stdin and not no_stdin
    check_tty_input(stdin, cfg.container.tty)
    try:
        client.request(Op.ATTACH)
        message = session(client, tty=cfg.container.tty, stdin=stdin, until=(),
                          detach_keys=DETACH_KEYS, proxy=sig_proxy)
    finally:
        client.close()
    if message["op"] == Op.DETACHED:
        return
    sys.exit(int(message.get("code", 125)))


COMMANDS = [exec_, attach]
