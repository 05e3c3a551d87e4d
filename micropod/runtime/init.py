"""The processes ``create`` forks: stage one enters the namespaces and forks the container's init (PID 1 of
a new pid namespace), which sets up the root, waits on the exec fifo for ``start``, and becomes the program.

Both are forked children of the runtime, so each failure is reported over the sync socket and ends the child
with ``os._exit``: nothing of the parent's Python state (buffers, atexit) runs twice.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from micropod import syscalls as sc
from micropod.errors import MicropodError, OciRuntimeError
from micropod.runtime import hooks, namespaces, rootfs
from micropod.runtime.namespaces import NamespacePlan
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
from micropod.runtime.state import OCI_VERSION
from micropod.runtime.sync import SyncSocket, fail_child


@dataclass
class InitPlan:
    """Everything the children need, decided by the runtime before it forks."""

    cid: str
    bundle: Path
    config: dict[str, Any]
    rootfs: Path
    plan: NamespacePlan
    fifo: Path
    cgroup_paths: dict[str, str]
    no_pivot: bool = False
    console: socket.socket | None = None
    preserve_fds: int = 0
    stdio: tuple[int, int, int] | None = None  # the container's stdin, stdout, stderr; else the runtime's
    seccomp: Any = None  # linux.seccomp already parsed (a seccomp.Filter), by a caller that keeps it parsed

    @property
    def linux(self) -> dict[str, Any]:
        return dict(self.config.get("linux") or {})

    @property
    def program(self) -> Program:
        seccomp = self.seccomp if self.seccomp is not None else self.linux.get("seccomp")
        return Program(self.config.get("process") or {}, seccomp, self.preserve_fds)


def stage_one(sync: SyncSocket, init: InitPlan) -> NoReturn:
    """Enter the namespaces and fork init; report its pid (as the runtime sees it) and leave."""
    try:
        sc.set_dumpable(False)  # the container must never open our /proc/PID/exe or fds
        if init.stdio is not None:
            take_stdio(init.stdio)
        keep = {sync.fileno(), *range(3, 3 + init.preserve_fds)}
        if init.console is not None:
            keep.add(init.console.fileno())
        detach_from_parent(keep)
        sync.expect("go")  # the runtime has put us in the cgroup: a new cgroup namespace is rooted there
        # Before any user namespace: the state directory is 0700, out of a mapped root's reach.
        fifo = os.open(init.fifo, os.O_PATH | os.O_CLOEXEC)  # reopened for writing after the pivot, by fd
        opened = init.plan.open_joined()
        joined_user = [item for item in opened if item[0] == "user"]
        namespaces.join(joined_user)
        if init.plan.new_user:
            namespaces.unshare(["user"])
            sync.send(userns=os.getpid())
            sync.expect("ok")
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        namespaces.join([item for item in opened if item[0] != "user"])
        namespaces.unshare([kind for kind in init.plan.create if kind != "user"])
        if "time" in init.plan.create and init.linux.get("timeOffsets"):
            namespaces.write_time_offsets(init.linux["timeOffsets"])
        child = os.fork()
        if child == 0:
            container_init(sync, init, fifo)
        sync.send(init=child)
    except MicropodError as exc:
        fail_child(sync, exc.message, getattr(exc, "launch_code", 125))
    except BaseException as exc:
        fail_child(sync, f"stage one: {exc}")
    os._exit(0)


def container_init(sync: SyncSocket, init: InitPlan, fifo: int) -> NoReturn:
    try:
        _setup(sync, init, fifo)
    except MicropodError as exc:
        fail_child(sync, exc.message, getattr(exc, "launch_code", 125))
    except OSError as exc:
        fail_child(sync, f"container init: {exc}{_where(exc)}")
    except BaseException as exc:
        fail_child(sync, f"container init: {exc!r}")
    raise AssertionError("unreachable")


def _setup(sync: SyncSocket, init: InitPlan, fifo: int) -> NoReturn:
    config, linux = init.config, init.linux
    os.setsid()
    setup = rootfs.RootfsSetup(init.rootfs, config, new_netns=init.plan.has("network"),
                               in_userns=init.plan.has("user"),
                               new_cgroupns="cgroup" in init.plan.create,
                               cgroup_paths=init.cgroup_paths)
    preload(init.program, bool((config.get("hooks") or {}).get("startContainer")))
    setup.prepare()
    sync.send(hooks="createRuntime")  # prestart and createRuntime run in the runtime's namespaces
    sync.expect("ok")
    hooks.run_hooks("createContainer", config.get("hooks"), _state(config, init, os.getpid()))
    ours = own_executable()
    rootfs.pivot(init.rootfs, init.no_pivot)
    seal_imports()
    if "uts" in init.plan.create or init.plan.has("uts"):
        if config.get("hostname"):
            sc.sethostname(str(config["hostname"]))
        if config.get("domainname"):
            sc.setdomainname(str(config["domainname"]))
    for key, value in (linux.get("sysctl") or {}).items():  # before /proc/sys turns read-only
        Path("/proc/sys", *str(key).split(".")).write_text(str(value))
    rootfs.mask_and_protect(config)
    process = init.program.process
    apply_limits(process)
    if process.get("terminal"):
        if init.stdio is not None:  # the caller's own pty: the slave is our stdio already
            sc.set_controlling_tty(0)
        else:
            attach_terminal(init.console, process)
    enter_cwd(str(process.get("cwd") or "/"))
    path = find_executable(init.program)
    refuse_our_interpreter(path, ours)
    sync.send(ready=True)
    sync.close()
    writer = os.open(f"/proc/self/fd/{fifo}", os.O_WRONLY | os.O_CLOEXEC)  # blocks until `start`
    os.write(writer, b"0")  # the writer stays open until execve closes it: `start` waits for that EOF
    os.close(fifo)
    hooks.run_hooks("startContainer", config.get("hooks"), _state(config, init, 1, "created"))
    execute(init.program, path)


def take_stdio(stdio: tuple[int, int, int]) -> None:
    for target, fd in enumerate(stdio):
        os.dup2(fd, target)  # dup2 clears close-on-exec on the copy
    for fd in set(stdio):
        if fd > 2:
            os.close(fd)


def _where(exc: BaseException) -> str:
    """The step that failed, for an OSError that does not say (a bare EPERM from a syscall)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f" (in {tb.tb_frame.f_code.co_name})" if tb is not None else ""


def attach_terminal(console: socket.socket | None, process: Mapping[str, Any]) -> None:
    """A pty from the container's devpts: the master goes to the console socket, the slave becomes stdio."""
    if console is None:
        raise OciRuntimeError("process.terminal needs --console-socket")
    master, slave = sc.open_pty("/dev/ptmx")
    name = os.ttyname(slave)
    socket.send_fds(console, [name.encode()], [master])
    os.close(master)
    console.close()
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    os.close(slave)
    sc.set_controlling_tty(0)
    size = process.get("consoleSize") or {}
    if size.get("height") and size.get("width"):
        sc.set_window_size(0, int(size["height"]), int(size["width"]))


def _state(config: dict[str, Any], init: InitPlan, pid: int, status: str = "creating") -> dict[str, Any]:
    return {"ociVersion": OCI_VERSION, "id": init.cid, "status": status, "pid": pid,
            "bundle": str(init.bundle), "annotations": config.get("annotations") or {}}
