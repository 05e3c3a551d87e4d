"""``exec``: another process in a running container's namespaces and cgroup, with its seccomp profile.

Stage one joins the namespaces of the container's init, then forks the process, which becomes a member of the
container's pid namespace. Both are non-dumpable until the exec, so the container cannot open their
/proc/PID/exe (the runtime's interpreter) or their fds while they are inside.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from micropod import syscalls as sc
from micropod.errors import ContainerStateError, MicropodError, OciRuntimeError, SpecError
from micropod.runtime import cgroups, namespaces
from micropod.runtime.init import attach_terminal, take_stdio
from micropod.runtime.lifecycle import Lifecycle, _console, _write_pid_file
from micropod.runtime.process import (
    Program,
    apply_limits,
    detach_from_parent,
    enter_cwd,
    execute,
    find_executable,
    own_executable,
    preload,
    refuse_our_interpreter,
    seal_imports,
)
from micropod.runtime.spec import load_bundle
from micropod.runtime.state import Container
from micropod.runtime.sync import SyncSocket, fail_child, raise_reported

MAX_PROCESS_JSON = 4 << 20


@dataclass
class ExecOptions:
    process_file: Path | None = None
    args: list[str] = field(default_factory=list)
    detach: bool = False
    tty: bool = False
    console_socket: Path | None = None
    pid_file: Path | None = None
    cwd: str | None = None
    env: list[str] = field(default_factory=list)
    user: str | None = None
    caps: list[str] = field(default_factory=list)
    no_new_privs: bool = False
    preserve_fds: int = 0
    additional_gids: list[int] = field(default_factory=list)
    stdio: tuple[int, int, int] | None = None


def build_process(config: dict[str, Any], options: ExecOptions) -> dict[str, Any]:
    """process.json as given, or the container's process with the command line's changes (runc's rules)."""
    if options.process_file is not None:
        try:
            with options.process_file.open("rb") as f:
                given = json.loads(f.read(MAX_PROCESS_JSON + 1)[:MAX_PROCESS_JSON])
        except (OSError, ValueError) as exc:
            raise OciRuntimeError(f"--process {options.process_file}: {exc}") from None
        if not isinstance(given, dict):
            raise SpecError("process", "must be an object")
        return given
    if not options.args:
        raise OciRuntimeError("exec: a command to run is required")
    base = dict(config.get("process") or {})
    process: dict[str, Any] = {**base, "args": options.args, "terminal": options.tty}
    process["env"] = [*(base.get("env") or []), *options.env]
    if options.cwd:
        process["cwd"] = options.cwd
    if options.user:
        uid, _, gid = options.user.partition(":")
        process["user"] = {"uid": int(uid), "gid": int(gid or 0), "additionalGids": options.additional_gids}
    if options.caps:
        capabilities = {k: list(v) for k, v in (base.get("capabilities") or {}).items()}
        for name in ("bounding", "effective", "permitted"):
            capabilities.setdefault(name, []).extend(c for c in options.caps if c not in capabilities[name])
        process["capabilities"] = capabilities
    if options.no_new_privs:
        process["noNewPrivileges"] = True
    return process


def exec_process(life: Lifecycle, cid: str, options: ExecOptions) -> int:
    """runc exec: start the process, then wait for it unless detached; its exit status."""
    container, pid = spawn_exec(life, cid, options)
    _write_pid_file(options.pid_file, pid)
    if options.detach:
        return 0
    return _wait(container, pid)


def spawn_exec(life: Lifecycle, cid: str, options: ExecOptions,
               process: dict[str, Any] | None = None) -> tuple[Container, int]:
    """The process started in the container (``process`` as given, or built from ``options``); its pid."""
    container, current = life.current(cid)
    if current in ("stopped", "paused"):
        raise ContainerStateError(f"cannot exec in a {current} container")
    config = load_bundle(Path(container.bundle)).config
    if process is None:
        process = build_process(config, options)
    program = Program(process, (config.get("linux") or {}).get("seccomp"), options.preserve_fds)
    kinds = [str(ns["type"]) for ns in (config.get("linux") or {}).get("namespaces") or []]
    joined = namespaces.of_process(container.pid, kinds)
    console = _console(options.console_socket)
    if not options.detach:
        sc.set_child_subreaper()
    parent, child = SyncSocket.pair()
    stage = os.fork()
    if stage == 0:
        parent.close()
        _stage_one(child, joined, program, console, options.stdio)
    child.close()
    if console is not None:
        console.close()
    try:
        cgroups.cgroup_from_paths(container.cgroup_paths).add(stage)
        parent.send(go=True)
        pid = int(parent.expect("pid")["pid"])
        while (message := parent.recv()) is not None:  # EOF: the program's execve closed the socket
            if "error" in message:
                raise_reported(message)
    finally:
        parent.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(stage, 0)
    return container, pid


def _wait(container: Container, pid: int) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, lambda n, _f: _signal(pid, n))
    while True:
        try:
            done, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 255
        if done == pid:
            return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _stage_one(sync: SyncSocket, joined: list[tuple[str, str]], program: Program, console: Any,
               stdio: tuple[int, int, int] | None) -> NoReturn:
    try:
        sc.set_dumpable(False)
        if stdio is not None:
            take_stdio(stdio)
        keep = {sync.fileno(), *range(3, 3 + program.preserve_fds)}
        if console is not None:
            keep.add(console.fileno())
        detach_from_parent(keep)
        sync.expect("go")
        plan = namespaces.NamespacePlan(create=(), join=tuple(joined))
        preload(program, has_hooks=False)
        ours = own_executable()
        namespaces.join(plan.open_joined())
        seal_imports()
        child = os.fork()
        if child == 0:
            _become(sync, program, console, stdio is not None, ours)
        sync.send(pid=child)
    except MicropodError as exc:
        fail_child(sync, exc.message, getattr(exc, "launch_code", 125))
    except BaseException as exc:
        fail_child(sync, f"exec: {exc}")
    os._exit(0)


def _become(sync: SyncSocket, program: Program, console: Any, own_stdio: bool, ours: tuple[int, int]) -> NoReturn:
    try:
        os.setsid()
        apply_limits(program.process)
        if program.process.get("terminal"):
            if own_stdio:
                sc.set_controlling_tty(0)
            else:
                attach_terminal(console, program.process)
        enter_cwd(str(program.process.get("cwd") or "/"))
        path = find_executable(program)
        refuse_our_interpreter(path, ours)
        execute(program, path)
    except MicropodError as exc:
        fail_child(sync, exc.message, getattr(exc, "launch_code", 125))
    except BaseException as exc:
        fail_child(sync, f"exec: {exc}")
    raise AssertionError("unreachable")
