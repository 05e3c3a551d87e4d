"""create, start, run, kill and delete: the runtime's side of a container's life."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from micropod import syscalls as sc
from micropod.errors import ContainerStateError, OciRuntimeError
from micropod.runtime import cgroups, hooks, log
from micropod.runtime.state import EXEC_FIFO, OCI_VERSION, Container, StateDir, spec_state, start_time, status

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket

START_POLL = 0.1


class CreateOptions:
    def __init__(self, bundle: Path, pid_file: Path | None = None, console_socket: Path | None = None,
                 no_pivot: bool = False, preserve_fds: int = 0, subreaper: bool = False,
                 stdio: tuple[int, int, int] | None = None, trusted_config: dict[str, Any] | None = None,
                 seccomp_filter: Any = None) -> None:
        self.bundle, self.pid_file, self.console_socket = bundle, pid_file, console_socket
        self.no_pivot, self.preserve_fds = no_pivot, preserve_fds
        self.subreaper = subreaper  # `run` waits for the init, so it must become its parent
        self.stdio = stdio  # the container's stdio (the agent's pipes); else ours
        self.trusted_config = trusted_config  # config.json as its in-process writer made it; else read and checked
        self.seccomp_filter = seccomp_filter  # trusted_config's linux.seccomp as a seccomp.Filter, parsed by it


def parse_signal(text: str) -> int:
    name = text.upper()
    if name.isdigit():
        number = int(name)
        if not 0 < number < 65:
            raise OciRuntimeError(f"invalid signal: {text}")
        return number
    name = name if name.startswith("SIG") else f"SIG{name}"
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise OciRuntimeError(f"invalid signal: {text}") from None


def _console(path: Path | None) -> socket.socket | None:
    if path is None:
        return None
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise OciRuntimeError(f"--console-socket {path}: {exc.strerror}") from None
    return sock


def _write_pid_file(path: Path | None, pid: int) -> None:
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(str(pid))
    os.replace(tmp, path)


def _host_root(linux: dict[str, Any]) -> tuple[int, int]:
    """The host uid and gid of the container's root: itself without a user namespace."""
    def mapped(key: str) -> int:
        return next((int(m["hostID"]) for m in linux.get(key) or [] if int(m["containerID"]) == 0), 0)
    return mapped("uidMappings"), mapped("gidMappings")


def checked_config(bundle: Any) -> dict[str, Any]:
    """config.json with what the other modules check checked too, and bind sources made absolute."""
    from micropod.runtime import caps, seccomp

    config = dict(bundle.config)
    process = config.get("process") or {}
    for warning in bundle.warnings:
        log.warning(warning)
    ignored = caps.parse(process.get("capabilities")).ignored
    if ignored:
        log.warning(f"ignoring unknown or unavailable capabilities: [{' '.join(ignored)}]")
    seccomp.validate((config.get("linux") or {}).get("seccomp"))
    config["mounts"] = [{"destination": m.destination, "type": m.type, "source": m.source,
                         "options": list(m.options)} for m in bundle.mounts]
    return config


class Lifecycle:
    def __init__(self, state_dir: StateDir) -> None:
        self.states = state_dir

    def create(self, cid: str, options: CreateOptions) -> Container:
        # Only create pays for these imports: state, start, kill and delete are separate runs of the runtime.
        from micropod.runtime.cgroups_devices import container_device_rules
        from micropod.runtime.init import InitPlan, stage_one
        from micropod.runtime.namespaces import NamespacePlan
        from micropod.runtime.spec import load_bundle
        from micropod.runtime.sync import SyncSocket

        if options.trusted_config is not None:
            # The agent's own bundle, handed over in memory: it wrote it, so reading it back and checking
            # it again would only cost time (a tenth of a container's start under emulation).
            config = options.trusted_config
            bundle_path, rootfs = options.bundle, Path(str(config["root"]["path"]))
        else:
            bundle = load_bundle(options.bundle)
            config = checked_config(bundle)
            bundle_path, rootfs = bundle.path, bundle.rootfs
        linux = config.get("linux") or {}
        directory = self.states.reserve(cid)
        group: cgroups.Cgroup | None = None
        init_pid = 0
        try:
            fifo = directory / EXEC_FIFO
            os.mkfifo(fifo, 0o622)
            os.chown(fifo, *_host_root(linux))  # init reopens it as the container's root, as runc has it
            plan = NamespacePlan.from_config(linux.get("namespaces") or [])
            if not plan.has("mount"):
                raise OciRuntimeError("linux.namespaces: a mount namespace is required")
            group = cgroups.open_cgroup(linux.get("cgroupsPath"), cid)
            resources = dict(linux.get("resources") or {})
            # Always the device rules, as runc: without them the container inherits the host's allow-all.
            resources["devices"] = container_device_rules(resources.get("devices"), linux.get("devices") or [])
            group.validate(resources)
            group.create()
            group.apply(resources)
            init = InitPlan(cid=cid, bundle=bundle_path, config=config, rootfs=rootfs, plan=plan,
                            fifo=fifo, cgroup_paths=group.paths(), no_pivot=options.no_pivot,
                            console=_console(options.console_socket), preserve_fds=options.preserve_fds,
                            stdio=options.stdio, seccomp=options.seccomp_filter)
            if options.subreaper:
                sc.set_child_subreaper()
            parent, child = SyncSocket.pair()
            stage = os.fork()
            if stage == 0:
                parent.close()
                stage_one(child, init)
            child.close()
            if init.console is not None:
                init.console.close()
            try:
                init_pid = self._drive(parent, stage, group, init)
            finally:
                parent.close()
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(stage, 0)
            pid_start = start_time(init_pid)
            if pid_start is None:
                raise OciRuntimeError("the container's init exited during create")
            container = Container(id=cid, bundle=str(bundle_path), pid=init_pid, pid_start=pid_start,
                                  created=datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                                  annotations=dict(config.get("annotations") or {}),
                                  cgroup_paths=group.paths(), rootfs=str(rootfs),
                                  namespaces={k: "" for k in plan.create} | dict(plan.join),
                                  hooks=dict(config.get("hooks") or {}))
            self.states.save(container)
            _write_pid_file(options.pid_file, init_pid)
            return container
        except BaseException:
            if init_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(init_pid, signal.SIGKILL)
            if group is not None:
                group.kill_all(signal.SIGKILL)
                group.destroy()
            self.states.remove(cid)
            raise

    def _drive(self, sync: Any, stage: int, group: cgroups.Cgroup, init: Any) -> int:
        """Answer stage one and init until init is ready; returns init's pid.

        Stage one and init share the socket, so init's messages can overtake stage one's report of its pid
        (stage one is descheduled after its fork): they wait until the pid is known, which the hooks' state
        and the caller need."""
        group.add(stage)
        sync.send(go=True)
        init_pid = 0
        deferred: list[dict[str, Any]] = []
        while True:
            message = deferred.pop(0) if init_pid and deferred else sync.recv()
            if message is None:
                raise OciRuntimeError("the container's init exited during create")
            if "error" in message:
                from micropod.runtime.sync import raise_reported

                raise_reported(message)
            if "userns" in message:
                from micropod.runtime import namespaces

                namespaces.write_id_maps(int(message["userns"]), init.linux)
                sync.send(ok=True)
            elif "init" in message:
                init_pid = int(message["init"])
            elif not init_pid:
                deferred.append(message)
            elif message.get("hooks") == "createRuntime":
                state = {"ociVersion": OCI_VERSION, "id": init.cid, "status": "creating",
                         "pid": init_pid, "bundle": str(init.bundle),
                         "annotations": init.config.get("annotations") or {}}
                for kind in ("prestart", "createRuntime"):
                    hooks.run_hooks(kind, init.config.get("hooks"), state)
                sync.send(ok=True)
            elif message.get("ready"):
                return init_pid

    def current(self, cid: str) -> tuple[Container, str]:
        container = self.states.load(cid)
        frozen = False
        if container.init_alive():
            with contextlib.suppress(OciRuntimeError):
                frozen = cgroups.cgroup_from_paths(container.cgroup_paths).state() == "frozen"
        return container, status(self.states, container, frozen)

    def state(self, cid: str) -> dict[str, Any]:
        container, current = self.current(cid)
        return spec_state(container, current)

    def start(self, cid: str) -> Container:
        with self.states.locked(cid):
            container, current = self.current(cid)
            if current == "stopped":
                raise ContainerStateError("cannot start a container that has stopped")
            if current != "created":
                raise ContainerStateError("cannot start an already running container")
            # poststart runs once the program is executed, so only then is the EOF awaited (as runc, start
            # returns at the byte otherwise: the program's own start is no business of ours).
            self._release(container, wait_for_exec=bool((container.hooks or {}).get("poststart")))
        try:
            hooks.run_hooks("poststart", container.hooks, spec_state(container, "running"))
        except OciRuntimeError:
            self.kill(cid, signal.SIGKILL, all_processes=True)
            raise
        return container

    def _release(self, container: Container, wait_for_exec: bool) -> None:
        """Open the exec fifo for reading, which lets init's open for writing return; wait for its byte, and
        with ``wait_for_exec`` for the EOF of the program's execve too."""
        fifo = self.states.path(container.id) / EXEC_FIFO
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            while True:
                ready, _, _ = select.select([fd], [], [], START_POLL)
                if ready and os.read(fd, 1):
                    break
                if not container.init_alive():
                    raise ContainerStateError("cannot start a container that has stopped")
            # Then EOF: init's writer closes at the program's execve (or its exit), after startContainer hooks.
            while wait_for_exec and not (select.select([fd], [], [], START_POLL)[0] and not os.read(fd, 1)):
                if not container.init_alive():
                    break
        finally:
            os.close(fd)
            fifo.unlink(missing_ok=True)

    def wait(self, container: Container) -> int:
        """For `run`: the init's exit status, as a shell reports it (128+N for signal N)."""
        while True:
            try:
                pid, code = os.waitpid(-1, 0)
            except ChildProcessError:
                return 255
            if pid == container.pid:
                return os.waitstatus_to_exitcode(code) if os.WIFEXITED(code) else 128 + os.WTERMSIG(code)

    def kill(self, cid: str, signum: int, all_processes: bool = False) -> None:
        container, current = self.current(cid)
        if all_processes:  # as runc: whatever the cgroup still holds, and no error once it is empty
            cgroups.cgroup_from_paths(container.cgroup_paths).kill_all(signum)
            return
        if current == "stopped":
            raise ContainerStateError("container not running")
        try:
            os.kill(container.pid, signum)
        except ProcessLookupError:
            raise ContainerStateError("container not running") from None

    def delete(self, cid: str, force: bool = False) -> None:
        with self.states.locked(cid):
            container, current = self.current(cid)
            if current in ("running", "paused") and not force:
                raise ContainerStateError(f"cannot delete container {cid} that is not stopped: {current}")
            group = cgroups.cgroup_from_paths(container.cgroup_paths)
            if current == "paused":
                group.thaw()
            group.kill_all(signal.SIGKILL)  # also when init has gone: without a pid namespace, others may not have
            if current != "stopped":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(container.pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while container.init_alive() and time.monotonic() < deadline:
                    time.sleep(0.005)
            group.destroy()
            hooks.run_hooks("poststop", container.hooks, spec_state(container, "stopped"))
            self.states.remove(cid)
