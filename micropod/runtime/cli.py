"""``micropod-runtime``: runc's command line. Every failure is one line (on stderr, and in ``--log`` as runc
writes it, which is where containerd's shim looks) and exit status 1; ``--debug`` adds the traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from micropod.errors import MicropodError, OciRuntimeError
from micropod.runtime.state import DEFAULT_ROOT, StateDir

log = logging.getLogger("micropod.runtime")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return json.dumps({"level": record.levelname.lower().replace("warning", "warn"), "msg": record.getMessage(),
                           "time": f"{stamp}.{int(record.msecs):03d}Z"})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="micropod-runtime", description="an OCI runtime with runc's interface")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    p.add_argument("--log", type=Path)
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--systemd-cgroup", action="store_true")
    p.add_argument("--rootless", default="auto")
    p.add_argument("--criu", default="criu")
    p.add_argument("-v", "--version", action="store_true")
    sub = p.add_subparsers(dest="command")

    def command(name: str, *, cid: bool = True) -> argparse.ArgumentParser:
        parser = sub.add_parser(name)
        if cid:
            parser.add_argument("id")
        return parser

    for name in ("create", "run"):
        c = command(name)
        c.add_argument("-b", "--bundle", type=Path, default=Path("."))
        c.add_argument("--pid-file", type=Path)
        c.add_argument("--console-socket", type=Path)
        c.add_argument("--no-pivot", action="store_true")
        c.add_argument("--no-new-keyring", action="store_true")
        c.add_argument("--preserve-fds", type=int, default=0)
        if name == "run":
            c.add_argument("-d", "--detach", action="store_true")
            c.add_argument("--keep", action="store_true")
    command("start")
    st = command("state")
    st.set_defaults()
    k = command("kill")
    k.add_argument("signal", nargs="?", default="SIGTERM")
    k.add_argument("-a", "--all", action="store_true")
    d = command("delete")
    d.add_argument("-f", "--force", action="store_true")
    ps = command("ps")
    ps.add_argument("-f", "--format", choices=("table", "json"), default="table")
    ps.add_argument("ps_args", nargs="*")
    for name in ("pause", "resume"):
        command(name)
    ev = command("events")
    ev.add_argument("--stats", action="store_true")
    ev.add_argument("--interval", default="5s")
    up = command("update")
    up.add_argument("-r", "--resources")
    for flag in ("--memory", "--memory-reservation", "--memory-swap", "--kernel-memory", "--cpu-period",
                 "--cpu-quota", "--cpu-share", "--cpuset-cpus", "--cpuset-mems", "--pids-limit",
                 "--blkio-weight", "--cpu-rt-period", "--cpu-rt-runtime", "--l3-cache-schema", "--mem-bw-schema"):
        up.add_argument(flag)
    ls = command("list", cid=False)
    ls.add_argument("-f", "--format", choices=("table", "json"), default="table")
    ls.add_argument("-q", "--quiet", action="store_true")
    sp = command("spec", cid=False)
    sp.add_argument("-b", "--bundle", type=Path, default=Path("."))
    sp.add_argument("--rootless", action="store_true")
    command("features", cid=False)
    ex = command("exec")
    ex.add_argument("command_args", nargs=argparse.REMAINDER)
    ex.add_argument("-p", "--process", type=Path)
    ex.add_argument("-d", "--detach", action="store_true")
    ex.add_argument("-t", "--tty", action="store_true")
    ex.add_argument("--console-socket", type=Path)
    ex.add_argument("--pid-file", type=Path)
    ex.add_argument("--cwd")
    ex.add_argument("-e", "--env", action="append", default=[])
    ex.add_argument("-u", "--user")
    ex.add_argument("--additional-gids", "-g", action="append", default=[])
    ex.add_argument("-c", "--cap", action="append", default=[])
    ex.add_argument("--no-new-privs", action="store_true")
    ex.add_argument("--preserve-fds", type=int, default=0)
    ex.add_argument("--apparmor")
    ex.add_argument("--process-label")
    return p


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if args.log is not None:
        file_handler = logging.FileHandler(args.log)
        if args.log_format == "json":
            file_handler.setFormatter(JsonFormatter())
        handlers.append(file_handler)
    logging.basicConfig(level=level, handlers=handlers, format="%(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args)
    if args.version:
        print("micropod-runtime version 0.1.0\nspec: 1.2.0")
        return 0
    if args.command is None:
        _parser().print_usage(sys.stderr)
        return 1
    try:
        if args.systemd_cgroup:
            raise OciRuntimeError("--systemd-cgroup is not supported: micropod-runtime drives cgroupfs itself")
        return _dispatch(args)
    except MicropodError as exc:
        log.error("%s", exc, exc_info=args.debug)
        return exc.exit_code if isinstance(exc, OciRuntimeError) else 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from micropod.runtime import commands  # the commands' imports are paid only when one runs

    handlers: dict[str, Callable[[StateDir, argparse.Namespace], int]] = {
        name: getattr(commands, f"cmd_{name}") for name in commands.COMMANDS
    }
    return handlers[args.command](StateDir(args.root), args)


def print_json(data: Any, indent: int | None = 2) -> None:
    sys.stdout.write(json.dumps(data, indent=indent) + "\n")


if __name__ == "__main__":
    sys.exit(main())
