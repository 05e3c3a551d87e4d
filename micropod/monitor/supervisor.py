"""Each boot's event loop and the ending: the Monitor that main runs and the package's other modules serve
(micropod.monitor describes the whole)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from micropod import guestmsg
from micropod.channel import Frame
from micropod.containerlog import ContainerLog
from micropod.errors import AgentError, ChannelFull, ContainerCommandError, MicropodError, printable
from micropod.liveness import ProcessRef
from micropod.monitor import api
from micropod.monitor.clients import READ, WRITE, Connections, Watchlist, wake_on_signals
from micropod.monitor.guest import GuestFrames
from micropod.monitor.launch import (
    EXIT_KILLED,
    MAIN,
    SHUTDOWN_GRACE,
    NetworkAttachment,
    OnReply,
    VmProcess,
    boot_container,
    console_tail,
    remove_vm_sockets,
)
from micropod.monitor.requests import ClientRequests
from micropod.monitor.restart import run_with_restarts
from micropod.monitor.sessions import ExecSessions
from micropod.monitor.update import apply_update
from micropod.monitor.volumes import VolumeClaims
from micropod.net import lifecycle
from micropod.paths import StateRoot, VmDir
from micropod.runconfig import RestartPolicy, RunConfig
from micropod.state import StateStore
from micropod.wire import GuestOp

log = logging.getLogger("micropod.monitor")



class Monitor:
    def __init__(self, root: StateRoot, vm_id: str, attach: socket.socket | None, maintenance: bool = False) -> None:
        self.root = root
        # Maintenance: boot a stopped container's VM with its disks mounted but no process started, for
        # `cp`; the state store's record is left to the client, and no restart policy applies.
        self.maintenance = maintenance
        self.vm_dir: VmDir = root.vm(vm_id)
        self.cfg = RunConfig.load(self.vm_dir.config)
        self.store = StateStore(root.db)
        self.watch = Watchlist()
        self.clients = Connections(self.vm_dir, self.watch, self)
        self.sessions = ExecSessions(self.clients, self.call_agent)
        self.requests = ClientRequests(self.cfg, self.clients, self.sessions, self)
        self.network = NetworkAttachment(root, self.cfg)
        self.volumes = VolumeClaims(root, self.cfg.vm_id, self.cfg.container.volumes)
        self.vm = self._new_vm()
        self._pids_limit = self.cfg.container.pids_limit
        self.exit_code: int | None = None
        self.error: str | None = None
        self.kill_deadline: float | None = None
        self.stop_escalated = False  # the stop timeout's SIGKILL has gone to the container
        self.done = False
        self.user_stopped = False
        self.container_log = ContainerLog(self.vm_dir.container_log, self.cfg.log.max_size,
                                          self.cfg.log.max_files, self.cfg.log.cri_path)
        self.frames = GuestFrames(self.container_log, self.clients, self.sessions, self)
        self._wake_r, self._wake_w = socket.socketpair()
        if attach is not None:
            self.clients.add(attach, attached=True)

    # -- boots (restart.Boots) --------------------------------------------------------------------

    @property
    def restart_policy(self) -> RestartPolicy:
        return self.cfg.restart

    def run(self) -> int:
        wake_on_signals(self._wake_w)
        try:
            if self.maintenance:
                self.run_once()  # no restart policy applies
            else:
                run_with_restarts(self)
        finally:
            self._finish()
        return 0

    def run_once(self) -> int:
        """One boot of the VM until it ends; every failure becomes an exit code and an error."""
        try:
            self._boot_and_start()
            self._loop()
        except ContainerCommandError as exc:
            self._set_exit(exc.exit_code, exc.message)
        except MicropodError as exc:
            self._set_exit(exc.exit_code, str(exc))
        except Exception as exc:  # the monitor must always record an ending and clean up
            log.exception("monitor failure")
            self._set_exit(125, f"monitor failure: {exc!r}")
        finally:
            self._end_vm()
        return 125 if self.exit_code is None else self.exit_code

    def announce_restart(self, code: int, restarts: int) -> None:
        """The restart policy wants another boot: say so, like docker's "Restarting (code)"."""
        log.info("restarting the VM (restart %d) after exit code %d", restarts, code)
        self.store.update(self.cfg.vm_id, status="restarting", exit_code=code, error=self.error,
                          finished=time.time(), restart_count=restarts)
        self.clients.broadcast(api.exit_message(code, self.error, restarting=True), only_attached=False)
        self.clients.drop_all()

    def wait(self, delay: float) -> bool:
        """Wait ``delay`` seconds, serving clients; False if a stop, a kill or a signal came meanwhile."""
        self.watch.renew()
        self.clients.listen()
        self.watch.watch(self._wake_r, "signal")
        deadline = time.monotonic() + delay
        while not self.user_stopped:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            self._update_watch()
            for what, mask in self.watch.ready(remaining):
                if what == "signal":
                    self._wake_r.recv(64)
                    self.user_stopped = True
                else:
                    self._dispatch(what, mask)
        return False

    def reset(self) -> None:
        self.clients.drop_all()
        self.watch.renew()
        self.exit_code = None
        self.error = None
        self.kill_deadline = None
        self.stop_escalated = False
        self.done = False
        self.vm = self._new_vm()
        self.sessions.clear()
        remove_vm_sockets(self.vm_dir)

    # -- one boot --------------------------------------------------------------------------------

    def _new_vm(self) -> VmProcess:
        def record_vmm(ref: ProcessRef) -> None:
            self.store.update(self.cfg.vm_id, vmm_pid=ref.pid, vmm_start=ref.started)

        return VmProcess(self.cfg, self.vm_dir, record_vmm, self._on_frame)

    def _boot_and_start(self) -> None:
        self.volumes.claim()
        boot_container(self.vm, self.cfg, self.network, self.maintenance)
        if not self.maintenance:
            self.store.update(self.cfg.vm_id, status="running", started=time.time())
        self.clients.broadcast(api.started_message(self.cfg.vm_id))

    def _loop(self) -> None:
        assert self.vm.link is not None
        self.clients.listen()
        self.watch.watch(self.vm.link.channel.sock, "agent")
        self.watch.watch(self._wake_r, "signal")
        if self.vm.pidfd is not None:
            self.watch.watch(self.vm.pidfd, "vmm")
        while not self.done:
            timeout = None if self.kill_deadline is None else max(0.0, self.kill_deadline - time.monotonic())
            self._update_watch()
            events = self.watch.ready(timeout)
            if self.kill_deadline is not None and time.monotonic() >= self.kill_deadline:
                self._stop_timeout_expired()
            for what, mask in events:
                self._dispatch(what, mask)

    def _update_watch(self) -> None:
        """Back-pressure both ways: read the agent only while every held client keeps up, and read a stdin
        forwarder only while the agent keeps up; write wherever something is queued."""
        link = self.vm.link
        if link is not None and self.watch.watched(link.channel.sock):
            held = self.clients.attached | set(self.sessions.sid_of_client)
            events = 0 if self.clients.holding_back(held) else READ
            self.watch.set_events(link.channel.sock, events | (WRITE if link.channel.backlog else 0))
        congested = self.vm.congested
        for fd, client in self.clients.clients.items():
            paused = congested and self.requests.forwards_stdin(fd)
            self.watch.set_events(client.sock, (0 if paused else READ) | (WRITE if client.backlog else 0))

    def _dispatch(self, what: object, mask: int = READ) -> None:
        if what == "listener":
            self.clients.accept()
        elif what == "agent":
            if mask & WRITE:
                self._on_agent_writable()
            if mask & READ:
                self._on_agent_readable()
        elif what == "vmm":
            self._on_vmm_exit()
        elif what == "signal":
            self._wake_r.recv(64)
            self.user_stopped = True
            self._kill_vm("the monitor was asked to terminate")
        elif isinstance(what, int):
            if mask & WRITE:
                self.clients.flush(what)
            if mask & READ and what in self.clients.clients:
                self.requests.on_readable(what)

    # -- agent events ----------------------------------------------------------------------------

    def _on_agent_writable(self) -> None:
        link = self.vm.link
        assert link is not None
        try:
            link.channel.flush()
        except AgentError:
            self._on_agent_readable()  # notices the closed channel

    def _on_agent_readable(self) -> None:
        link = self.vm.link
        assert link is not None
        for frame in self.vm.read_frames():
            self._on_frame(frame)
        if link.channel.closed:
            self.watch.forget(link.channel.sock)
            if self.exit_code is None:
                self._wait_vmm_gone()

    def _on_frame(self, frame: Frame) -> None:
        self.frames.on_frame(frame)

    # -- guest events (guest.GuestEvents) ----------------------------------------------------------

    def deliver_reply(self, reply: guestmsg.Reply) -> None:
        self.vm.deliver_reply(reply)

    def main_exited(self, code: int) -> None:
        log.debug("phase: container exited with %d", code)
        if self.exit_code is None:
            self.exit_code = code
        with contextlib.suppress(AgentError):
            self.vm.send(GuestOp.SHUTDOWN)
        # The agent powers the VM off; bound that with a kill deadline.
        self.kill_deadline = time.monotonic() + SHUTDOWN_GRACE

    def _on_vmm_exit(self) -> None:
        log.debug("phase: VMM exited")
        if self.exit_code is None:
            tail = console_tail(self.vm_dir, self.vm.vmm)
            self._set_exit(EXIT_KILLED, f"the VM exited unexpectedly; console tail:\n{tail}")
        self.done = True

    def _wait_vmm_gone(self) -> None:
        """The agent channel closed without an exit: the VM is going down; give it a moment."""
        self.kill_deadline = min(self.kill_deadline or float("inf"), time.monotonic() + SHUTDOWN_GRACE)

    def _kill_vm(self, reason: str) -> None:
        log.info("killing the VM: %s", reason)
        if self.exit_code is None:
            self.exit_code = EXIT_KILLED
        self.vm.kill()
        self.done = True

    # -- what clients ask of the container (requests.Container) ------------------------------------

    def running(self) -> bool:
        return self.exit_code is None and self.vm.link is not None

    def accepts_exec(self) -> bool:
        return self.exit_code is None and self.kill_deadline is None

    def call_agent(self, op: str, reply: OnReply | None = None, **fields: Any) -> None:
        self.vm.call(op, reply, **fields)

    def signal_main(self, signum: int) -> None:
        if self.running():
            self._unless_channel_gone(lambda: self.vm.send(GuestOp.SIGNAL, id=MAIN, signal=signum))

    def write_stdin(self, sid: int, kind: int, payload: bytes) -> None:
        self._unless_channel_gone(lambda: self.vm.send_stdin(sid, kind, payload))

    def _unless_channel_gone(self, send: Callable[[], object]) -> None:
        """A write to the agent; when the channel has gone, the VM is as good as gone. A full one is the
        caller's to report (ChannelFull): the VM may just be busy."""
        try:
            send()
        except ChannelFull:
            raise
        except AgentError:
            self._kill_vm("the agent channel is gone")

    def stop(self, signum: int, timeout: float) -> None:
        self.user_stopped = True
        deadline = time.monotonic() + max(0.0, timeout)
        self.kill_deadline = min(self.kill_deadline or float("inf"), deadline)
        try:
            self.signal_main(signum)
        except ChannelFull:
            log.warning("stop: the agent is not reading its channel; the VM is killed after the timeout")

    def _stop_timeout_expired(self) -> None:
        """docker's SIGKILL after the timeout, to the container first: its PID 1 ignores a TERM it has no
        handler for, and killing the VM outright would lose what the guest has not written to its disk yet.
        The agent then reports the exit and powers off cleanly; if it does not, within the grace, the VM dies."""
        if self.stop_escalated or not self.running():
            self._kill_vm("stop timeout expired")
            return
        self.stop_escalated = True
        self.kill_deadline = time.monotonic() + SHUTDOWN_GRACE
        try:
            self.signal_main(int(signal.SIGKILL))
        except ChannelFull:
            self._kill_vm("stop timeout expired and the agent is not reading its channel")

    def kill(self) -> None:
        self.user_stopped = True
        self._kill_vm("killed on request")

    def update(self, done: Callable[[str | None], None]) -> None:
        """`micropod update` rewrote the container's config.json: what changed goes onto the running VM, and
        ``done`` hears whether it all took (None) or why not."""
        new = apply_update(self.root, self.cfg, self.vm_dir, self.vm)
        self.cfg = self.requests.cfg = self.vm.cfg = new
        if new.container.pids_limit == self._pids_limit or not self.running():
            done(None)
            return

        def answer(reply: guestmsg.Reply) -> None:
            if reply.ok:
                self._pids_limit = new.container.pids_limit  # what the guest holds now
            done(None if reply.ok else printable(reply.message or "the agent refused the update"))

        self.call_agent(GuestOp.UPDATE, answer, id=MAIN, pids_limit=new.container.pids_limit)

    def end_maintenance(self) -> None:
        """A clean power-off: the agent unmounts the container's disks first."""
        self.user_stopped = True
        if self.exit_code is None:
            self.main_exited(0)

    # -- client events (clients.ClientEvents) ------------------------------------------------------

    def client_gone(self, fd: int) -> None:
        self.sessions.hang_up(fd)

    def last_client_gone(self) -> None:
        if self.maintenance and not self.done:
            self.end_maintenance()  # nobody is left to copy anything

    # -- ending ----------------------------------------------------------------------------------

    def _set_exit(self, code: int, error: str | None) -> None:
        if self.exit_code is None:
            self.exit_code = code
        if error and self.error is None:
            self.error = printable(error)  # it quotes the guest (console tails, agent refusals) to terminals

    def _end_vm(self) -> None:
        if self.vm.link is not None:
            self.watch.forget(self.vm.link.channel.sock)
        if self.vm.pidfd is not None:
            self.watch.forget(self.vm.pidfd)
        self.vm.end()
        self.container_log.close()

    def _finish(self) -> None:
        code = 125 if self.exit_code is None else self.exit_code
        self.vm_dir.monitor_sock.unlink(missing_ok=True)
        remove_vm_sockets(self.vm_dir)
        network_error = self.network.detach()
        if network_error:
            self._set_exit(125, network_error)
        self.volumes.release(forget=self.cfg.auto_remove and not self.maintenance)
        if self.vm.host_cgroup is not None:
            self.vm.host_cgroup.destroy()
        if self.maintenance:
            pass
        elif self.cfg.auto_remove:
            shutil.rmtree(self.vm_dir.path, ignore_errors=True)
            if self.cfg.network.enabled:
                lifecycle.release_lease(self.root, self.cfg.vm_id)
            self.store.delete(self.cfg.vm_id)
        else:
            self.store.update(self.cfg.vm_id, status="exited", exit_code=code, error=self.error,
                              finished=time.time())
        self.clients.broadcast(api.exit_message(code, self.error), only_attached=False)
        self.clients.drop_all()

