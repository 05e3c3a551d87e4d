"""One function per runc command: parse what argparse gave, call the lifecycle, print what runc prints."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from pathlib import Path

from micropod.errors import ContainerStateError, OciRuntimeError
from micropod.runtime import cgroups
from micropod.runtime.cli import print_json
from micropod.runtime.lifecycle import CreateOptions, Lifecycle, parse_signal
from micropod.runtime.state import StateDir, validate_id

COMMANDS = ("create", "run", "start", "state", "kill", "delete", "ps", "pause", "resume", "events", "update",
            "list", "spec", "features", "exec")


def _options(args: argparse.Namespace, subreaper: bool = False) -> CreateOptions:
    return CreateOptions(bundle=args.bundle.absolute(), pid_file=args.pid_file and args.pid_file.absolute(),
                         console_socket=args.console_socket, no_pivot=args.no_pivot,
                         preserve_fds=args.preserve_fds, subreaper=subreaper)


def cmd_create(states: StateDir, args: argparse.Namespace) -> int:
    validate_id(args.id)
    Lifecycle(states).create(args.id, _options(args))
    return 0


def cmd_run(states: StateDir, args: argparse.Namespace) -> int:
    validate_id(args.id)
    life = Lifecycle(states)
    container = life.create(args.id, _options(args, subreaper=not args.detach))
    try:
        life.start(args.id)
    except OciRuntimeError:
        life.delete(args.id, force=True)
        raise
    if args.detach:
        return 0
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
    for signum in forwarded:
        signal.signal(signum, lambda n, _f: _forward(container.pid, n))
    code = life.wait(container)
    if not args.keep:
        life.delete(args.id, force=True)
    return code


def _forward(pid: int, signum: int) -> None:
    import os

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def cmd_start(states: StateDir, args: argparse.Namespace) -> int:
    Lifecycle(states).start(args.id)
    return 0


def cmd_state(states: StateDir, args: argparse.Namespace) -> int:
    print_json(Lifecycle(states).state(args.id))
    return 0


def cmd_kill(states: StateDir, args: argparse.Namespace) -> int:
    Lifecycle(states).kill(args.id, parse_signal(args.signal), all_processes=args.all)
    return 0


def cmd_delete(states: StateDir, args: argparse.Namespace) -> int:
    try:
        Lifecycle(states).delete(args.id, force=args.force)
    except ContainerStateError as exc:
        if args.force and "does not exist" in exc.message:
            return 0  # runc: delete -f of an unknown id succeeds
        raise
    return 0


def _group(states: StateDir, cid: str) -> cgroups.Cgroup:
    container = states.load(cid)
    return cgroups.cgroup_from_paths(container.cgroup_paths)


def _running(states: StateDir, cid: str) -> str:
    _, current = Lifecycle(states).current(cid)
    return current


def cmd_ps(states: StateDir, args: argparse.Namespace) -> int:
    pids = sorted(_group(states, args.id).pids())
    if args.format == "json":
        print_json(pids, indent=None)
        return 0
    import subprocess

    out = subprocess.run(["ps", *(args.ps_args or ["-ef"])], capture_output=True, text=True, check=False)
    lines = out.stdout.splitlines()
    if not lines:
        raise OciRuntimeError(f"ps: {out.stderr.strip()}")
    header = lines[0].split()
    column = header.index("PID") if "PID" in header else 1
    print(lines[0])
    for line in lines[1:]:
        fields = line.split()
        if len(fields) > column and fields[column].isdigit() and int(fields[column]) in pids:
            print(line)
    return 0


def cmd_pause(states: StateDir, args: argparse.Namespace) -> int:
    current = _running(states, args.id)
    if current != "running":
        raise ContainerStateError(f"container not running: {current}")
    _group(states, args.id).freeze()
    return 0


def cmd_resume(states: StateDir, args: argparse.Namespace) -> int:
    current = _running(states, args.id)
    if current != "paused":
        raise ContainerStateError("container not paused")
    _group(states, args.id).thaw()
    return 0


def cmd_events(states: StateDir, args: argparse.Namespace) -> int:
    if _running(states, args.id) == "stopped":
        raise ContainerStateError("container not running")
    stats = _group(states, args.id).stats()
    print_json({"type": "stats", "id": args.id, "data": stats}, indent=None)
    return 0


_UPDATE_FLAGS = {
    "memory": ("memory", "limit"), "memory_reservation": ("memory", "reservation"),
    "memory_swap": ("memory", "swap"), "cpu_period": ("cpu", "period"), "cpu_quota": ("cpu", "quota"),
    "cpu_share": ("cpu", "shares"), "cpuset_cpus": ("cpu", "cpus"), "cpuset_mems": ("cpu", "mems"),
    "pids_limit": ("pids", "limit"), "blkio_weight": ("blockIO", "weight"),
    "cpu_rt_period": ("cpu", "realtimePeriod"), "cpu_rt_runtime": ("cpu", "realtimeRuntime"),
}


def cmd_update(states: StateDir, args: argparse.Namespace) -> int:
    if args.resources:
        text = sys.stdin.read() if args.resources == "-" else Path(args.resources).read_text()
        try:
            resources = json.loads(text)
        except ValueError as exc:
            raise OciRuntimeError(f"--resources: not JSON: {exc}") from None
    else:
        resources = {}
        for name, (section, key) in _UPDATE_FLAGS.items():
            value = getattr(args, name)
            if value is None:
                continue
            if key in ("cpus", "mems"):
                resources.setdefault(section, {})[key] = value
            else:
                from micropod.units import parse_size

                number = parse_size(value) if section == "memory" and not value.lstrip("-").isdigit() else int(value)
                resources.setdefault(section, {})[key] = number
    if _running(states, args.id) == "stopped":
        raise ContainerStateError("container not running")
    group = _group(states, args.id)
    group.validate(resources)
    group.apply(resources)
    return 0


def cmd_list(states: StateDir, args: argparse.Namespace) -> int:
    life = Lifecycle(states)
    rows = [life.state(cid) | {"owner": _owner(states.path(cid))} for cid in states.ids()]
    if args.quiet:
        for row in rows:
            print(row["id"])
    elif args.format == "json":
        print_json(rows, indent=None)
    else:
        print(f"{'ID':<12} {'PID':<8} {'STATUS':<10} {'BUNDLE':<20} {'CREATED':<30} OWNER")
        for row in rows:
            print(f"{row['id']:<12} {row['pid']:<8} {row['status']:<10} {row['bundle']:<20} "
                  f"{row['created']:<30} {row['owner']}")
    return 0


def _owner(path: Path) -> str:
    """Who owns the state directory, by name ("#UID" without one), as runc's list shows it."""
    import pwd

    uid = path.stat().st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"


def cmd_spec(states: StateDir, args: argparse.Namespace) -> int:
    from micropod.runtime import spec_defaults

    target = args.bundle / "config.json"
    if target.exists():
        raise OciRuntimeError(f"File {target} exists. Remove it first")
    target.write_text(json.dumps(spec_defaults.default_spec(rootless=args.rootless), indent="\t") + "\n")
    return 0


def cmd_features(states: StateDir, args: argparse.Namespace) -> int:
    from micropod.runtime import spec_defaults

    print_json(spec_defaults.features())
    return 0


def cmd_exec(states: StateDir, args: argparse.Namespace) -> int:
    from micropod.runtime.execute import ExecOptions, exec_process

    options = ExecOptions(process_file=args.process, args=list(args.command_args), detach=args.detach,
                          tty=args.tty, console_socket=args.console_socket, pid_file=args.pid_file,
                          cwd=args.cwd, env=list(args.env), user=args.user, caps=list(args.cap),
                          no_new_privs=args.no_new_privs, preserve_fds=args.preserve_fds,
                          additional_gids=[int(g) for g in args.additional_gids])
    try:
        return exec_process(Lifecycle(states), args.id, options)
    except OciRuntimeError as exc:
        exc.exit_code = 255  # runc exec's status for every failure of its own
        raise
