"""A pod's monitor: one process per pod, as a container's monitor is one per container. It boots the pod's VM
with its drive pool and no container, then serves its control socket: containers are added, stopped and
removed while the VM runs (micropod/monitor/members.py), each with its own log, exit and clients. The VM powers
off only on `pod stop`, `pod kill` or `pod rm`, or when it dies.

Run as ``python -m micropod.monitor --root ROOT --pod POD_ID``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from micropod import guestmsg, wire
from micropod.channel import Frame
from micropod.errors import AgentError, MicropodError, printable
from micropod.liveness import ProcessRef
from micropod.monitor import api
from micropod.monitor.clients import READ, WRITE, Connections, Watchlist, wake_on_signals
from micropod.monitor.guest import route_frame
from micropod.monitor.launch import (
    EXIT_KILLED,
    SHUTDOWN_GRACE,
    NetworkAttachment,
    VmProcess,
    console_tail,
    remove_vm_sockets,
)
from micropod.monitor.members import Member, Members
from micropod.monitor.podrequests import PodRequests
from micropod.monitor.sessions import ExecSessions
from micropod.paths import StateRoot
from micropod.podconfig import PodConfig
from micropod.state import StateStore
from micropod.state.pods import PodStore
from micropod.vmm.factory import build_pod_spec, pod_disks
from micropod.wire import GuestOp

log = logging.getLogger("micropod.monitor")



class PodMonitor:
    def __init__(self, root: StateRoot, pod_id: str) -> None:
        self.root = root
        self.vm_dir = root.pod(pod_id)
        self.cfg = PodConfig.load(self.vm_dir.config)
        self.store = StateStore(root.db)
        self.pods = PodStore(root.db)
        self.watch = Watchlist()
        self.clients = Connections(self.vm_dir, self.watch, self)
        self.sessions = ExecSessions(self.clients, self.call_agent)
        self.network = NetworkAttachment(root, self.cfg)
        self.vm = VmProcess(self.cfg, self.vm_dir, self._record_vmm, self._on_frame)
        self.members = Members(root, pod_id, self.store, self)
        self.requests = PodRequests(self)
        self.interest: dict[int, str] = {}  # client -> the container it asked about, whose exit it hears
        self.attached: dict[int, str] = {}  # client -> the container whose output it sees
        self.stopping = False
        self.stop_deadline: float | None = None
        self.kill_deadline: float | None = None
        self.done = False
        self.error: str | None = None
        self._wake_r, self._wake_w = socket.socketpair()

    def run(self) -> int:
        wake_on_signals(self._wake_w)
        try:
            self._boot()
            self._loop()
        except MicropodError as exc:
            self.error = self.error or printable(str(exc))
        except Exception as exc:  # the monitor must always record an ending and clean up
            log.exception("pod monitor failure")
            self.error = self.error or printable(f"monitor failure: {exc!r}")
        finally:
            self._finish()
        return 0

    # -- the VM ----------------------------------------------------------------------------------

    def _record_vmm(self, ref: ProcessRef) -> None:
        self.pods.update(self.cfg.pod_id, vmm_pid=ref.pid, vmm_start=ref.started)

    def _boot(self) -> None:
        if self.cfg.network.mode == "cni":
            # the VMM (and its TAP) live in the pod's namespace; nothing here needs the host's network
            from micropod.net import netns

            netns.enter(Path(self.cfg.network.netns))
        spec, _ = self.vm.power_on(self.network, lambda attached: build_pod_spec(self.cfg, self.vm_dir, attached),
                                   with_network=True)
        assert self.vm.vmm is not None
        self.members.booted(spec, pod_disks(self.vm.vmm, spec, self.cfg, self.vm_dir))
        self.pods.update(self.cfg.pod_id, status="running", started=time.time(), error=None, finished=None)
        log.info("pod VM up")
        self.clients.listen()
        self.clients.broadcast(api.started_message(self.cfg.pod_id), only_attached=False)

    def _loop(self) -> None:
        assert self.vm.link is not None
        self.watch.watch(self.vm.link.channel.sock, "agent")
        self.watch.watch(self._wake_r, "signal")
        if self.vm.pidfd is not None:
            self.watch.watch(self.vm.pidfd, "vmm")
        while not self.done:
            self._update_watch()
            deadline = min((t for t in (self.members.next_deadline(), self.stop_deadline, self.kill_deadline)
                            if t is not None), default=None)
            events = self.watch.ready(None if deadline is None else max(0.0, deadline - time.monotonic()))
            for what, mask in events:
                self._dispatch(what, mask)
            self._on_timers(time.monotonic())

    def _update_watch(self) -> None:
        link = self.vm.link
        if link is not None and self.watch.watched(link.channel.sock):
            held = set(self.attached) | set(self.sessions.sid_of_client)
            events = 0 if self.clients.holding_back(held) else READ
            self.watch.set_events(link.channel.sock, events | (WRITE if link.channel.backlog else 0))
        congested = self.vm.congested
        for fd, client in self.clients.clients.items():
            paused = congested and self.requests.forwards_stdin(fd)
            self.watch.set_events(client.sock, (0 if paused else READ) | (WRITE if client.backlog else 0))

    def _dispatch(self, what: object, mask: int) -> None:
        if what == "listener":
            self.clients.accept()
        elif what == "agent":
            self._on_agent(mask)
        elif what == "vmm":
            log.info("the pod's VMM exited")
            if not self.stopping:
                tail = console_tail(self.vm_dir, self.vm.vmm)
                self.error = printable(f"the VM exited unexpectedly; console tail:\n{tail}")
            self.done = True
        elif what == "signal":
            self._wake_r.recv(64)
            self.kill("the monitor was asked to terminate")
        elif isinstance(what, int):
            if mask & WRITE:
                self.clients.flush(what)
            if mask & READ and what in self.clients.clients:
                self.requests.on_readable(what)

    def _on_agent(self, mask: int) -> None:
        link = self.vm.link
        assert link is not None
        if mask & WRITE:
            try:
                link.channel.flush()
            except AgentError:
                mask |= READ  # the read notices the closed channel
        for frame in self.vm.read_frames() if mask & READ else []:
            self._on_frame(frame)
        if link.channel.closed:
            self.watch.forget(link.channel.sock)
            self.kill_deadline = min(self.kill_deadline or float("inf"), time.monotonic() + SHUTDOWN_GRACE)

    def _on_timers(self, now: float) -> None:
        try:
            self.members.on_timers(now)
        except MicropodError as exc:
            log.warning("%s", exc)
        if self.stopping and not self.members.running():
            self.done = True  # every container has ended: power off
        if self.stop_deadline is not None and now >= self.stop_deadline:
            self.stop_deadline = None
            for member in self.members.running():
                with contextlib.suppress(MicropodError):
                    self.send(GuestOp.SIGNAL, id=member.cid, signal=int(signal.SIGKILL))
            self.kill_deadline = now + SHUTDOWN_GRACE
        if self.kill_deadline is not None and now >= self.kill_deadline:
            self.kill("the pod did not stop in time")

    # -- what the guest sends --------------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        route_frame(frame, self._main_output, self.sessions, self._on_message)

    def _main_output(self, sid: int, fd: int, payload: bytes) -> bool:
        member = self.members.by_sid.get(sid)
        if member is None:
            return False
        member.log.write("stdout" if fd == wire.STDOUT else "stderr", payload)
        for client, cid in list(self.attached.items()):
            if cid == member.cid:
                self.clients.send_to(client, lambda c: c.send_data(fd, payload))
        return True

    def _on_message(self, message: guestmsg.GuestMessage) -> None:
        if isinstance(message, guestmsg.Reply):
            self.vm.deliver_reply(message)
        elif isinstance(message, guestmsg.Exit):
            session = self.sessions.by_sid.get(message.sid)
            if self.members.on_exit(message.cid, message.sid, message.code, self.stopping):
                pass
            elif session is not None and session.container == message.cid:
                self.sessions.ended(message.sid, message.code, message.message)
            else:
                guestmsg.refuse(f"an exit of session {message.sid} of {message.cid[:12]}, which does not exist")
        elif isinstance(message, guestmsg.Syslog):
            member = self.members.by_id.get(message.cid)
            if member is None:
                guestmsg.refuse(f"syslog of container {message.cid[:12]}, which is not in this pod")
            else:
                member.log.write("syslog", (message.message.rstrip("\n") + "\n").encode(errors="surrogateescape"))
        elif isinstance(message, guestmsg.Log):
            log.info("agent: %s", printable(message.message))

    # -- members.PodVm -----------------------------------------------------------------------------

    def request(self, op: str, deadline: float, **fields: Any) -> None:
        self.vm.request(op, deadline, **fields)

    def send(self, op: str, **fields: Any) -> None:
        self.vm.send(op, **fields)

    def call_agent(self, op: str, reply: Any = None, **fields: Any) -> None:
        self.vm.call(op, reply, **fields)

    def next_sid(self) -> int:
        return self.sessions.next_sid()

    def refs(self) -> tuple[ProcessRef | None, ProcessRef | None]:
        pid = self.vm.vmm.pid if self.vm.vmm is not None else None
        return ProcessRef.of(os.getpid()), ProcessRef.of(pid) if pid is not None else None

    def exited(self, member: Member, code: int, error: str | None) -> None:
        message = api.exit_message(code, error, restarting=member.restart_at is not None)
        for client, cid in list(self.interest.items()):
            if cid == member.cid:
                self.clients.send_to(client, lambda c: c.send_control(message))

    # -- the pod as a whole (podrequests.Pod) ------------------------------------------------------

    def stop(self, timeout: float) -> None:
        """podman's pod stop: each container's stop signal, SIGKILL after ``timeout``, then power-off."""
        self.stopping = True
        self.stop_deadline = time.monotonic() + max(0.0, timeout)
        for member in self.members.running():
            member.user_stopped = True
            with contextlib.suppress(MicropodError):
                self.send(GuestOp.SIGNAL, id=member.cid, signal=member.cfg.stop_signal)
        for member in list(self.members.by_id.values()):
            member.restart_at = None

    def kill(self, reason: str) -> None:
        log.info("killing the pod's VM: %s", reason)
        self.stopping = True
        self.vm.kill()
        self.done = True

    # -- clients (clients.ClientEvents) ------------------------------------------------------------

    def client_gone(self, fd: int) -> None:
        self.sessions.hang_up(fd)
        self.interest.pop(fd, None)
        self.attached.pop(fd, None)

    def last_client_gone(self) -> None:
        pass

    # -- ending ----------------------------------------------------------------------------------

    def _finish(self) -> None:
        code = EXIT_KILLED if self.error or not self.stopping else 0
        if self.vm.link is not None:
            self.watch.forget(self.vm.link.channel.sock)
        if self.vm.pidfd is not None:
            self.watch.forget(self.vm.pidfd)
        self.vm.end()
        self.members.ended_with_vm(EXIT_KILLED, self.error)
        self.vm_dir.monitor_sock.unlink(missing_ok=True)
        remove_vm_sockets(self.vm_dir)
        network_error = self.network.detach()
        if self.vm.host_cgroup is not None:
            self.vm.host_cgroup.destroy()
        self.pods.update(self.cfg.pod_id, status="stopped", finished=time.time(),
                         error=self.error or network_error, vmm_pid=None, vmm_start=None)
        self.clients.broadcast(api.exit_message(code, self.error), only_attached=False)
        self.clients.drop_all()

