"""What a pod monitor's clients send: requests about one of the pod's containers (each names it in
"container"), and the pod's own stop and kill."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from micropod.errors import AgentError, ChannelFull, ContainerCommandError, UsageError, printable
from micropod.monitor import api
from micropod.monitor.api import Op
from micropod.monitor.requests import RequestReader, signal_field, timeout_field
from micropod.paths import check_vm_id
from micropod.wire import GuestOp

if TYPE_CHECKING:
    from micropod import guestmsg
    from micropod.monitor.members import Member
    from micropod.monitor.pod import PodMonitor

log = logging.getLogger("micropod.monitor")

_CONTAINER_OPS = (Op.ATTACH, Op.ADD, Op.REMOVE, Op.EXEC, Op.CP_GET, Op.CP_PUT, Op.SIGNAL, Op.STOP, Op.KILL,
                  Op.WAIT, Op.RESIZE, Op.REOPEN_LOG, Op.UPDATE)


class PodRequests(RequestReader):
    def __init__(self, pod: PodMonitor) -> None:
        super().__init__(pod.clients, pod.sessions)
        self.pod = pod
        self.members = pod.members

    def _on_request(self, fd: int, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == Op.POD_STOP:
            self.pod.stop(timeout_field(message))
        elif op == Op.POD_KILL:
            self.pod.kill("killed on request")
        elif op == Op.STATS and message.get("container") is not None:
            cid = _container_id(message)
            member = self.members.by_id.get(cid)

            def of_container(op: str, reply: Any = None, **fields: Any) -> None:
                self.pod.call_agent(op, reply, id=cid, **fields)

            self._stats(fd, member is not None and member.running, of_container)
        elif op == Op.STATS:
            self._stats(fd, self.pod.vm.link is not None, self.pod.call_agent)
        elif op in _CONTAINER_OPS:
            self._on_container_request(fd, op, _container_id(message), message)
        else:
            raise AgentError(f"unknown pod monitor request {op!r}")

    def _on_container_request(self, fd: int, op: str, cid: str, message: dict[str, Any]) -> None:
        self.pod.interest[fd] = cid
        if op == Op.ATTACH:
            self.pod.attached[fd] = cid
        elif op == Op.ADD:
            if self.pod.stopping:
                raise ContainerCommandError("the pod is stopping", 125)
            self.members.add(cid)
            self.clients.send_to(fd, lambda c: c.send_control(api.started_message(cid)))
        elif op == Op.REMOVE:
            self.members.remove(cid)
            self.clients.send_to(fd, lambda c: c.send_control(api.removed_message(cid)))
        elif op in (Op.EXEC, Op.CP_GET, Op.CP_PUT):
            self._start_exec(fd, cid, op, message)
        elif op == Op.SIGNAL and fd in self.sessions.sid_of_client:
            self.sessions.send_signal(fd, signal_field(message, 0))
        elif op == Op.SIGNAL:
            self.members.signal(cid, signal_field(message, 0))
        elif op == Op.STOP:
            member = self._member(cid)
            self.members.stop(cid, signal_field(message, member.cfg.stop_signal), timeout_field(message))
        elif op == Op.KILL:
            self.members.signal(cid, 9)
        elif op == Op.RESIZE:
            self._resize(fd, cid, int(message["rows"]), int(message["cols"]))
        elif op == Op.REOPEN_LOG:
            member = self._member(cid)
            if not member.running or member.log.cri is None:
                raise ContainerCommandError(f"container {cid[:12]} is not running or has no CRI log", 125)
            member.log.cri.reopen()
            self.clients.send_to(fd, lambda c: c.send_control(api.log_reopened_message(cid)))
        elif op == Op.UPDATE:
            self._update(fd, cid)
        # WAIT: the client now hears the container's exit

    def _member(self, cid: str) -> Member:
        member = self.members.by_id.get(cid)
        if member is None:
            raise ContainerCommandError(f"container {cid[:12]} is not running in this pod", 125)
        return member

    def _update(self, fd: int, cid: str) -> None:
        """The container's config.json has new limits: a running container's cgroup in the VM takes them (a
        stopped one's next start does)."""
        member = self.members.reload(cid)

        def answer(reply: guestmsg.Reply | None = None) -> None:
            message = (api.updated_message() if reply is None or reply.ok
                       else api.error_message(printable(reply.message or "the agent refused the update")))
            self.clients.send_to(fd, lambda c: c.send_control(message))

        if not member.running:
            answer()
            return
        self.pod.call_agent(GuestOp.UPDATE, answer, id=cid, **member.cfg.container.limits())

    def _start_exec(self, fd: int, cid: str, op: str, message: dict[str, Any]) -> None:
        if self.pod.stopping:
            raise ContainerCommandError("the pod is stopping", 125)
        if op == Op.EXEC:
            member = self._member(cid)
            if not member.running:
                raise ContainerCommandError(f"container {member.cfg.name} is not running", 125)
        else:  # cp works on a container that does not run too: its disks are mounted for it
            self.members.mount(cid)
        if op == Op.EXEC:
            agent_op, fields = GuestOp.EXEC, {"spec": message.get("spec") or {}}
        else:
            agent_op = GuestOp.ARCHIVE_GET if op == Op.CP_GET else GuestOp.ARCHIVE_PUT
            fields = {"path": str(message["path"])}
        self.sessions.start(fd, bool(message.get("detach")), agent_op, fields, container=cid)

    def _resize(self, fd: int, cid: str, rows: int, cols: int) -> None:
        sid = self.sessions.sid_of_client.get(fd)
        if sid is None and self.pod.attached.get(fd) == cid:
            sid = self._member(cid).sid
        if sid is not None:
            self.pod.call_agent(GuestOp.RESIZE, sid=sid, rows=rows, cols=cols)

    def forwards_stdin(self, fd: int) -> bool:
        return fd in self.sessions.sid_of_client or fd in self.pod.attached

    def _attached_sid(self, fd: int) -> int | None:
        member = self.members.by_id.get(self.pod.attached.get(fd, ""))
        if member is None or not member.running or not member.cfg.container.stdin:
            return None
        return member.sid

    def _write_stdin(self, sid: int, kind: int, payload: bytes) -> None:
        try:
            self.pod.vm.send_stdin(sid, kind, payload)
        except ChannelFull:
            raise
        except AgentError:
            pass  # the VM is going: its end reaches every client


def _container_id(message: dict[str, Any]) -> str:
    cid = message.get("container")
    if not isinstance(cid, str):
        raise UsageError(f"{message['op']} needs the container's id")
    return check_vm_id(cid)

