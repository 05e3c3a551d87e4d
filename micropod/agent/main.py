"""micropod's guest agent: PID 1 inside the VM.

Boot mounts, then one channel to the host, ``hello``, and a single-threaded epoll loop over the
channel, the container processes' stdio and a signal wakeup pipe. The host drives it with the ops
of wire.py (create, start, exec, signal, resize, shutdown); the agent streams stdio as DATA and
EOF frames and reports each exit after its last output. It reaps every zombie, forwards the signals
it receives to the containers' main processes, and powers the VM off at the end.

Its settings come from the kernel command line (micropod/agent/entry.py).

Standard library only, and few imports: this runs as ``python3.11 -I -S`` on every VM boot.
"""

from __future__ import annotations

import os
import select
import time

from micropod import syscalls, wire
from micropod.agent import boot, handover, launch, mounts, process, signals, stats
from micropod.agent.console import console
from micropod.agent.containers import Container, Proc, adopt, exec_spec, mount_container, valid_id
from micropod.agent.errors import RequestError, describe
from micropod.agent.filecopy import FileCopy
from micropod.agent.hostlink import HostLink
from micropod.agent.stdio import Stdio
from micropod.agent.syslog import Syslog
from micropod.wire import GuestOp

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal  # the same functions and numbers, with stubs
    from collections.abc import Callable
    from typing import Any
else:
    import _signal  # signal.py itself would import enum

_KILL_WAIT = 5.0


class Agent:
    def __init__(self, config: boot.Config) -> None:
        self.config = config
        self.poller = select.epoll()
        self.interest: dict[int, int] = {}
        self.link = HostLink(self)
        self.containers: dict[str, Container] = {}
        self.procs: dict[int, Proc] = {}
        self.stdio = Stdio(self)
        self.syslog = Syslog(self)
        self.copies = FileCopy(self)
        self.shutdown_at: float | None = None
        self.running = True
        self.handover = handover.enabled(dict(os.environ))
        # Containers run through micropod-runtime; MICROPOD_AGENT_RUNTIME=0 (tests of the agent on a host
        # without root, and the hostile-guest harness) keeps the plain chroot.
        self.use_runtime = os.environ.get("MICROPOD_AGENT_RUNTIME", "1") != "0"
        if self.use_runtime:
            from micropod.agent import runtime

            runtime.warm_up()
        self.handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            GuestOp.CREATE: self.on_create,
            GuestOp.START: self.on_start,
            GuestOp.EXEC: self.on_exec,
            GuestOp.SIGNAL: self.on_signal,
            GuestOp.RESIZE: self.on_resize,
            GuestOp.SHUTDOWN: self.on_shutdown,
            GuestOp.RESTORE: self.on_restore,
            GuestOp.NETWORK: boot.configure_network,
            GuestOp.STATS: self.on_stats,
            GuestOp.ARCHIVE_GET: self.copies.on_archive_get,
            GuestOp.ARCHIVE_PUT: self.copies.on_archive_put,
            GuestOp.REMOVE: self.on_remove,
            GuestOp.UPDATE: self.on_update,
        }
        self.wakeup_r = signals.catch((_signal.SIGCHLD, *signals.FORWARDED_SIGNALS))
        self.watch(self.wakeup_r, select.EPOLLIN)

    # --- plumbing -------------------------------------------------------------------------------

    def watch(self, fd: int, events: int) -> None:
        """Set the epoll interest of ``fd``; 0 removes it."""
        current = self.interest.get(fd)
        if events == 0:
            if current is not None:
                self.poller.unregister(fd)
                del self.interest[fd]
        elif current is None:
            self.poller.register(fd, events)
            self.interest[fd] = events
        elif current != events:
            self.poller.modify(fd, events)
            self.interest[fd] = events

    def send(self, frame: bytes) -> None:
        self.link.send(frame)

    def send_control(self, message: dict[str, Any]) -> None:
        self.send(wire.encode_control(message))

    def log(self, message: str) -> None:
        console(message)
        self.send_control({"op": GuestOp.LOG, "message": message})

    # --- the loop -------------------------------------------------------------------------------

    def run(self) -> int:
        while self.running:
            events = self.poller.poll(self.next_timeout())
            for fd, mask in events:
                try:
                    self.on_event(fd, mask)
                except Exception as exc:
                    self.log(f"internal error on fd {fd}: {type(exc).__name__}: {exc}")
            try:
                self.on_timers()
            except Exception as exc:
                self.log(f"internal error in timers: {type(exc).__name__}: {exc}")
            if self.config.test_mode and self.link.channel is None:
                self.shutdown()  # a test that hangs up leaves nothing behind
                self.running = False
        return 0

    def next_timeout(self) -> float:
        deadlines = [t for t in (self.shutdown_at, self.link.reattach_at) if t is not None]
        if not deadlines:
            return -1
        return max(0.0, min(deadlines) - time.monotonic())

    def on_timers(self) -> None:
        now = time.monotonic()
        self.link.on_timer(now)
        if self.shutdown_at is not None and now >= self.shutdown_at:
            self.log("no shutdown from the host after the container exited; powering off")
            self.shutdown()
            self.end()

    def on_event(self, fd: int, mask: int) -> None:
        if fd == self.wakeup_r:
            self.on_signals()
        elif self.link.owns(fd):
            self.link.on_ready(fd)
        elif fd in self.syslog.sockets:
            self.syslog.forward(fd)
        elif fd in self.stdio.fd_procs:
            self.stdio.on_ready(fd, mask)

    def on_signals(self) -> None:
        caught = signals.caught(self.wakeup_r)
        if _signal.SIGCHLD in caught:
            self.reap()
        for signum in sorted(caught - {_signal.SIGCHLD}):
            self.forward_signal(signum)

    def forward_signal(self, signum: int) -> None:
        targets = [c.main for c in self.containers.values() if c.main is not None and not c.main_done]
        if not targets:
            console(f"signal {signum} received with no container running; ignored")
        for proc in targets:
            signals.send_signal(proc.pid, signum)

    # --- requests -------------------------------------------------------------------------------

    def on_request(self, message: dict[str, Any]) -> None:
        self.link.loss_reported = False
        op, req = message["op"], message.get("req")
        power_off = False
        try:
            handler = self.handlers.get(op)
            if handler is None:
                raise RequestError(f"unknown op {op!r}")
            result = handler(message)
            power_off = op == GuestOp.SHUTDOWN
        except (RequestError, launch.LaunchError) as exc:
            self.reply_error(req, op, str(exc), exc.code)
        except Exception as exc:  # the host must get an answer whatever went wrong
            self.reply_error(req, op, describe(exc), 125)
        else:
            self.send_control({"op": GuestOp.OK, "req": req, **result})
        if power_off:
            self.end()

    def on_restore(self, message: dict[str, Any]) -> dict[str, Any]:
        return boot.restore(message, self.config.test_mode)

    def reply_error(self, req: object, op: str, message: str, code: int) -> None:
        console(f"{op} failed: {message}")
        self.send_control({"op": GuestOp.ERROR, "req": req, "message": message, "code": code})

    def container(self, message: dict[str, Any]) -> Container:
        cid = message.get("id")
        if not isinstance(cid, str) or cid not in self.containers:
            raise RequestError(f"no such container: {cid}")
        return self.containers[cid]

    def on_create(self, message: dict[str, Any]) -> dict[str, Any]:
        cid, spec = message.get("id"), message.get("spec")
        if not isinstance(cid, str) or not valid_id(cid):
            raise RequestError(f"invalid container id {cid!r}")
        if not isinstance(spec, dict):
            raise RequestError("create needs a spec object")
        if cid in self.containers:
            if adopt(self.containers[cid], spec):  # resumed from a root-ready snapshot (micropod/vmm/rootsnap.py)
                return {"prepared": True}
            raise RequestError(f"container {cid} already exists")
        if message.get("disks") is not None:
            from micropod.agent import hotdisk

            hotdisk.substitute(spec, hotdisk.resolve(message["disks"]))
        # A lone container uses the mount points the guest image provides; a pod's containers go to /run.
        in_pod = self.config.pod or self.containers
        mount_base = f"/run/micropod-{cid}" if in_pod else self.config.mount_base
        container = mount_container(cid, spec, mount_base)
        container.prepared = message.get("prepare") is True and not in_pod
        self.containers[cid] = container
        self.syslog.serve(container)
        return {}

    def on_start(self, message: dict[str, Any]) -> dict[str, Any]:
        container = self.container(message)
        if container.main is not None:
            raise RequestError(f"container {container.cid} has already been started")
        sid = int(message.get("sid", container.spec.get("sid", 1)))
        self.check_sid_free(sid)
        if self.handover:
            handover.hand_over(self.link, container, message, sid)
        child = process.spawn(launch.Launch(container.root, container.spec, is_exec=False),
                              (container.cid, container.spec) if self.use_runtime else None)
        container.main = self.track(container, sid, child, is_main=True)
        return {"pid": child.pid}

    def on_exec(self, message: dict[str, Any]) -> dict[str, Any]:
        container = self.container(message)
        if container.main is None or container.main_done:
            raise RequestError(f"container {container.cid} is not running")
        sid = int(message["sid"])
        self.check_sid_free(sid)
        spec = exec_spec(container.spec, message.get("spec") or {})
        child = process.spawn(launch.Launch(container.root, spec, is_exec=True),
                              (container.cid, container.spec) if self.use_runtime else None)
        self.track(container, sid, child, is_main=False)
        return {"pid": child.pid}

    def on_signal(self, message: dict[str, Any]) -> dict[str, Any]:
        container = self.container(message)
        signum = signals.signal_number(message.get("signal"))
        if "sid" in message:
            target = self.proc_by_sid(int(message["sid"]))
        else:
            target = None if container.main_done else container.main
        if target is None or target.container is not container:
            raise RequestError(f"container {container.cid} is not running")
        os.kill(target.pid, signum)
        return {}

    def on_resize(self, message: dict[str, Any]) -> dict[str, Any]:
        proc = self.proc_by_sid(int(message["sid"]))
        if proc is None or proc.master is None:
            raise RequestError(f"session {message['sid']} has no terminal")
        syscalls.set_window_size(proc.master, int(message["rows"]), int(message["cols"]))
        return {}

    def on_stats(self, message: dict[str, Any]) -> dict[str, Any]:
        """The guest's counters, read as `docker stats` needs them (a pod's container's own, given its id); the
        host turns two samples into rates."""
        if message.get("id") is None:
            return stats.guest_stats()
        return stats.container_stats(self.container(message).cid)

    def on_update(self, message: dict[str, Any]) -> dict[str, Any]:
        """New cgroup limits for a running container: those of the message's limit keys (bundle.limits)."""
        container = self.container(message)
        from micropod.agent import bundle, runtime

        try:
            resources = bundle.limits(message, updating=True)
        except bundle.SecurityError as exc:
            raise RequestError(str(exc)) from None
        cleared = bundle.cleared_cpusets(message)
        if resources or cleared:
            runtime.update(container.cid, resources, cleared)
        return {}

    def on_remove(self, message: dict[str, Any]) -> dict[str, Any]:
        """A pod's container goes: whatever of it still runs is killed, and its filesystems unmounted, so that
        the host can take its disks off the VM."""
        container = self.container(message)
        doomed = [p for p in self.procs.values() if p.container is container]

        def kill() -> None:
            for proc in doomed:
                if proc.pid in self.procs:
                    signals.kill_group(proc.pid, _signal.SIGKILL)

        if not self.kill_until_gone(kill, lambda: any(p.pid in self.procs for p in doomed)):
            raise RequestError(f"the processes of container {container.cid} did not die")
        self.syslog.stop_serving(container)
        errors = mounts.unmount_all(container.mounted)
        del self.containers[container.cid]
        if errors:  # a lazy unmount: the filesystem may live on, so its disk must not be reused
            raise RequestError(f"container {container.cid} was not cleanly unmounted: {'; '.join(errors)}")
        return {}

    def on_shutdown(self, message: dict[str, Any]) -> dict[str, Any]:
        errors = self.shutdown()
        return {"errors": errors} if errors else {}

    # --- processes ------------------------------------------------------------------------------

    def check_sid_free(self, sid: int) -> None:
        if sid < 1:
            raise RequestError(f"invalid session id {sid}")
        if self.proc_by_sid(sid) is not None:
            raise RequestError(f"session {sid} is in use")

    def proc_by_sid(self, sid: int) -> Proc | None:
        for proc in self.procs.values():
            if proc.sid == sid:
                return proc
        return None

    def track(self, container: Container, sid: int, child: process.Child, is_main: bool) -> Proc:
        proc = Proc(container, sid, child, is_main)
        self.procs[proc.pid] = proc
        self.stdio.add(proc)
        return proc

    def on_stdin(self, kind: int, stream: int, payload: bytes) -> None:
        sid, fd = wire.split_stream(stream)
        if fd == wire.STDIN and sid in self.copies.uploads:
            self.copies.on_upload(sid, kind, payload)
            return
        proc = self.proc_by_sid(sid)
        if fd != wire.STDIN or proc is None or proc.stdin is None or proc.stdin_eof:
            return  # input for a process that has gone, or never asked for stdin
        self.stdio.feed(proc, kind, payload)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.procs.pop(pid, None)
            if proc is not None:  # orphans of the container are only reaped
                self.finish(proc, os.waitstatus_to_exitcode(status))

    def finish(self, proc: Proc, exit_code: int) -> None:
        self.syslog.forward_all()  # messages the process logged come before its exit report
        self.stdio.close(proc)
        code = 128 - exit_code if exit_code < 0 else exit_code
        container = proc.container
        self.send_control({"op": GuestOp.EXIT, "id": container.cid, "sid": proc.sid, "code": code})
        if proc.is_main:
            container.main_done = True
            if self.use_runtime:
                from micropod.agent import runtime

                runtime.forget(container.cid)
            # Like the end of a PID namespace: the container's other processes go with its main one.
            for other in self.procs.values():
                if other.container is container:
                    signals.kill_group(other.pid, _signal.SIGKILL)
            signals.kill_group(proc.pid, _signal.SIGKILL)
            if not self.config.pod and all(c.main_done for c in self.containers.values()):
                self.shutdown_at = time.monotonic() + self.config.grace

    # --- the end --------------------------------------------------------------------------------

    def shutdown(self) -> list[str]:
        """Stop every process, report their exits, and unmount the containers' filesystems."""
        self.shutdown_at = None
        self.kill_everything()
        self.syslog.close()  # a bound socket keeps the container's /dev busy
        os.sync()
        errors: list[str] = []
        for container in reversed(list(self.containers.values())):
            errors += mounts.unmount_all(container.mounted)
        for error in errors:
            self.log(f"shutdown: {error}")
        return errors

    def kill_everything(self) -> None:
        def kill() -> None:
            if os.getpid() == 1:
                signals.send_signal(-1, _signal.SIGKILL)  # everything but ourselves
            for pid in [proc.pid for proc in self.procs.values()] + signals.children(os.getpid()):
                signals.kill_group(pid, _signal.SIGKILL)

        self.kill_until_gone(kill, lambda: bool(self.procs or signals.children(os.getpid())))
        for proc in list(self.procs.values()):
            self.log(f"process {proc.pid} did not die")

    def kill_until_gone(self, kill: Callable[[], None], alive: Callable[[], bool]) -> bool:
        """``kill`` and reap until nothing is ``alive``, within the kill wait; False if something survived."""
        deadline = time.monotonic() + _KILL_WAIT
        while True:
            kill()
            self.reap()
            remaining = deadline - time.monotonic()
            if not alive() or remaining <= 0:
                return not alive()
            select.select([self.wakeup_r], [], [], min(remaining, 0.1))
            signals.discard(self.wakeup_r)

    def end(self) -> None:
        if self.config.test_mode:
            self.running = False
            return
        try:
            syscalls.reboot(self.config.reboot)
        except OSError as exc:
            console(f"{exc}; exiting, which panics the kernel and ends the VM")
        os._exit(1)

