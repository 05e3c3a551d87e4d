"""``micropod-runtime``: runc's command line. Every failure is one line (on stderr, and in ``--log`` as runc
writes it, which is where containerd's shim looks) and exit status 1; ``--debug`` adds the traceback."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from micropod.errors import MicropodError, OciRuntimeError
from micropod.runtime import log
from micropod.runtime.state import DEFAULT_ROOT, StateDir

GLOBAL_WITH_VALUE = ("--root", "--log", "--log-format", "--rootless", "--criu")


def command_name(argv: Sequence[str]) -> str | None:
    """The command word, past the global options (and their values); None if there is none."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word.startswith("-"):
            skip = word in GLOBAL_WITH_VALUE
        else:
            return word
    return None


def _create_options(c: argparse.ArgumentParser, name: str) -> None:
    c.add_argument("-b", "--bundle", type=Path, default=Path("."))
    c.add_argument("--pid-file", type=Path)
    c.add_argument("--console-socket", type=Path)
    c.add_argument("--no-pivot", action="store_true")
    c.add_argument("--no-new-keyring", action="store_true")
    c.add_argument("--preserve-fds", type=int, default=0)
    if name == "run":
        c.add_argument("-d", "--detach", action="store_true")
        c.add_argument("--keep", action="store_true")


def _kill_options(k: argparse.ArgumentParser, name: str) -> None:
    k.add_argument("signal", nargs="?", default="SIGTERM")
    k.add_argument("-a", "--all", action="store_true")


def _delete_options(d: argparse.ArgumentParser, name: str) -> None:
    d.add_argument("-f", "--force", action="store_true")


def _ps_options(ps: argparse.ArgumentParser, name: str) -> None:
    ps.add_argument("-f", "--format", choices=("table", "json"), default="table")
    ps.add_argument("ps_args", nargs="*")


def _events_options(ev: argparse.ArgumentParser, name: str) -> None:
    ev.add_argument("--stats", action="store_true")
    ev.add_argument("--interval", default="5s")


def _update_options(up: argparse.ArgumentParser, name: str) -> None:
    up.add_argument("-r", "--resources")
    for flag in ("--memory", "--memory-reservation", "--memory-swap", "--kernel-memory", "--cpu-period",
                 "--cpu-quota", "--cpu-share", "--cpuset-cpus", "--cpuset-mems", "--pids-limit",
                 "--blkio-weight", "--cpu-rt-period", "--cpu-rt-runtime", "--l3-cache-schema", "--mem-bw-schema"):
        up.add_argument(flag)


def _list_options(ls: argparse.ArgumentParser, name: str) -> None:
    ls.add_argument("-f", "--format", choices=("table", "json"), default="table")
    ls.add_argument("-q", "--quiet", action="store_true")


def _spec_options(sp: argparse.ArgumentParser, name: str) -> None:
    sp.add_argument("-b", "--bundle", type=Path, default=Path("."))
    sp.add_argument("--rootless", action="store_true")


def _exec_options(ex: argparse.ArgumentParser, name: str) -> None:
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


def _no_options(parser: argparse.ArgumentParser, name: str) -> None:
    pass


# name -> (takes a container id, its options)
COMMAND_OPTIONS: dict[str, tuple[bool, Callable[[argparse.ArgumentParser, str], None]]] = {
    "create": (True, _create_options), "run": (True, _create_options), "start": (True, _no_options),
    "state": (True, _no_options), "kill": (True, _kill_options), "delete": (True, _delete_options),
    "ps": (True, _ps_options), "pause": (True, _no_options), "resume": (True, _no_options),
    "events": (True, _events_options), "update": (True, _update_options), "list": (False, _list_options),
    "spec": (False, _spec_options), "features": (False, _no_options), "exec": (True, _exec_options),
}


def _parser(only: str | None) -> argparse.ArgumentParser:
    """The global options, and the subcommand asked for alone: building all fifteen costs more than most
    commands take to run."""
    p = argparse.ArgumentParser(prog="micropod-runtime", description="an OCI runtime with runc's interface")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    p.add_argument("--log", type=Path)
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--systemd-cgroup", action="store_true")
    p.add_argument("--rootless", default="auto")
    p.add_argument("--criu", default="criu")
    p.add_argument("-v", "--version", action="store_true")
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMAND_OPTIONS) + "}")
    for name in COMMAND_OPTIONS if only not in COMMAND_OPTIONS else (only,):
        takes_id, options = COMMAND_OPTIONS[name]
        parser = sub.add_parser(name)
        if takes_id:
            parser.add_argument("id")
        if name == only:
            options(parser, name)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    args = _parser(command_name(words)).parse_args(words)
    log.configure(None if args.log is None else str(args.log), args.log_format, args.debug)
    if args.version:
        print("micropod-runtime version 0.1.0\nspec: 1.2.0")
        return 0
    if args.command is None:
        _parser(None).print_usage(sys.stderr)
        return 1
    try:
        if args.systemd_cgroup:
            raise OciRuntimeError("--systemd-cgroup is not supported: micropod-runtime drives cgroupfs itself")
        return _dispatch(args)
    except MicropodError as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        log.error(str(exc))
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
