"""What a monitor's clients send: requests on the control stream, and stdin for the main process or their exec
session."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from micropod import guestmsg, wire
from micropod.channel import decode
from micropod.errors import AgentError, ChannelFull, ContainerCommandError, MicropodError, UsageError, printable
from micropod.monitor import api
from micropod.monitor.api import Op
from micropod.monitor.clients import Connections
from micropod.monitor.launch import MAIN_SID, OnReply
from micropod.monitor.sessions import AgentCall, ExecSessions
from micropod.runconfig import RunConfig
from micropod.wire import GuestOp

log = logging.getLogger("micropod.monitor")


class Container(Protocol):
    """The monitor's side: the container as its current boot runs it."""

    @property
    def maintenance(self) -> bool:
        """Booted for `cp` only: no process runs, and a shutdown request ends it."""

    def running(self) -> bool:
        """The main process has not exited and the agent can be reached."""

    def accepts_exec(self) -> bool:
        """Running and not being stopped."""

    def call_agent(self, op: str, reply: OnReply | None = None, **fields: Any) -> None: ...

    def signal_main(self, signum: int) -> None: ...

    def stop(self, signum: int, timeout: float) -> None:
        """``signum`` to the main process, the VM killed after ``timeout`` seconds."""

    def kill(self) -> None: ...

    def end_maintenance(self) -> None: ...

    def write_stdin(self, sid: int, kind: int, payload: bytes) -> None: ...

    def update(self, done: Callable[[str | None], None]) -> None:
        """Apply the container's rewritten config.json; ``done`` hears None or why not."""


MAX_TIMEOUT = 24 * 3600.0


def timeout_field(message: dict[str, Any], default: float = 10.0) -> float:
    """A request's timeout, in seconds: finite and bounded."""
    value = float(message.get("timeout", default))
    if not 0 <= value <= MAX_TIMEOUT:  # NaN fails both
        raise UsageError(f"invalid timeout {value!r}: 0 to {MAX_TIMEOUT:.0f} seconds")
    return value


def signal_field(message: dict[str, Any], default: int) -> int:
    value = int(message.get("signal") or default)
    if not 0 < value < 65:
        raise UsageError(f"invalid signal {value}")
    return value


class RequestReader:
    """Frames from a client: each control request handled (a refusal answered with its reason), stdin passed on."""

    def __init__(self, clients: Connections, sessions: ExecSessions) -> None:
        self.clients = clients
        self.sessions = sessions

    def _on_request(self, fd: int, message: dict[str, Any]) -> None:
        raise NotImplementedError

    def _attached_sid(self, fd: int) -> int | None:
        """The main process whose stdin an attached client feeds (None if it feeds none)."""
        raise NotImplementedError

    def _write_stdin(self, sid: int, kind: int, payload: bytes) -> None:
        raise NotImplementedError

    def _on_stdin(self, fd: int, kind: int, payload: bytes) -> None:
        """A client's stdin goes to its exec session, or to the main process it is attached to."""
        session = self.sessions.of_client(fd)
        if session is not None and not session.started:
            return
        sid = session.sid if session is not None else self._attached_sid(fd)
        if sid is None:
            return
        try:
            self._write_stdin(sid, kind, payload)
        except ChannelFull:
            # Unreachable while stdin readers pause at the agent's high-water mark; say so if it happens.
            log.error("stdin for session %d lost: the agent channel is full", sid)

    def on_readable(self, fd: int) -> None:
        client = self.clients.clients[fd]
        try:
            frames = client.pump()
        except MicropodError:
            frames = []
        for kind, stream, payload in frames:
            if kind == wire.CONTROL:
                error = None
                try:
                    self._on_request(fd, decode(payload))
                except MicropodError as exc:
                    error = str(exc)
                except (KeyError, TypeError, ValueError) as exc:
                    error = f"malformed request: {exc!r}"
                if error is not None:
                    self._refuse(fd, error)
            elif stream == wire.STDIN:
                self._on_stdin(fd, kind, payload)
        if client.closed:
            self.clients.drop(fd)

    def _refuse(self, fd: int, error: str) -> None:
        text = printable(error)  # it may quote the agent
        self.clients.send_to(fd, lambda c: c.send_control(api.error_message(text)))

    def _stats(self, fd: int, running: bool, call_agent: AgentCall) -> None:
        """The guest's counters for the client on ``fd``."""
        def answer(reply: guestmsg.Reply) -> None:
            if not reply.ok:
                message = api.stats_failure_message(reply.message)
            else:
                try:
                    message = api.stats_reply_message(guestmsg.stats(reply))
                except guestmsg.BadGuestMessage as exc:
                    guestmsg.refuse(str(exc))
                    message = api.stats_failure_message("the guest sent malformed stats")
            self.clients.send_to(fd, lambda c: c.send_control(message))

        if not running:
            answer(guestmsg.Reply.failure("the container is not running"))
        else:
            call_agent(GuestOp.STATS, answer)


class ClientRequests(RequestReader):
    def __init__(self, cfg: RunConfig, clients: Connections, sessions: ExecSessions, container: Container) -> None:
        super().__init__(clients, sessions)
        self.cfg = cfg
        self.container = container

    def _on_request(self, fd: int, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == Op.ATTACH:
            self.clients.attached.add(fd)
        elif op == Op.EXEC:
            self._start_exec(fd, message, GuestOp.EXEC, {"spec": message.get("spec") or {}})
        elif op in (Op.CP_GET, Op.CP_PUT):
            self._start_exec(fd, message, GuestOp.ARCHIVE_GET if op == Op.CP_GET else GuestOp.ARCHIVE_PUT,
                             {"path": str(message["path"])})
        elif op == Op.RESIZE:
            sid = self.sessions.sid_of_client.get(fd, MAIN_SID if fd in self.clients.attached else None)
            if sid is not None and self.container.running():
                self.container.call_agent(GuestOp.RESIZE, sid=sid, rows=int(message["rows"]), cols=int(message["cols"]))
        elif op == Op.SIGNAL and fd in self.sessions.sid_of_client:
            self.sessions.send_signal(fd, signal_field(message, 0))
        elif op == Op.SIGNAL:
            self.container.signal_main(signal_field(message, 0))
        elif op == Op.STOP:
            self.container.stop(signal_field(message, self.cfg.stop_signal), timeout_field(message))
        elif op == Op.KILL:
            self.container.kill()
        elif op == Op.WAIT:
            pass  # every client hears the exit
        elif op == Op.SHUTDOWN and self.container.maintenance:
            self.container.end_maintenance()
        elif op == Op.STATS:
            self._stats(fd, self.container.running(), self.container.call_agent)
        elif op == Op.UPDATE:
            def done(error: str | None) -> None:
                message = api.updated_message() if error is None else api.error_message(error)
                self.clients.send_to(fd, lambda c: c.send_control(message))

            self.container.update(done)
        else:
            raise AgentError(f"unknown monitor request {op!r}")

    def _start_exec(self, fd: int, message: dict[str, Any], agent_op: str, fields: dict[str, Any]) -> None:
        """A session (an exec'd process, or a cp's tar stream) routed between one client and the agent."""
        if not self.container.accepts_exec():
            raise ContainerCommandError(f"container {self.cfg.vm_id} is not running", 125)
        self.sessions.start(fd, bool(message.get("detach")), agent_op, fields)

    def forwards_stdin(self, fd: int) -> bool:
        """The client on ``fd`` may send stdin for the agent: paused while the agent does not read."""
        return fd in self.sessions.sid_of_client or (fd in self.clients.attached and self.cfg.container.stdin)

    def _attached_sid(self, fd: int) -> int | None:
        return MAIN_SID if fd in self.clients.attached and self.cfg.container.stdin else None

    def _write_stdin(self, sid: int, kind: int, payload: bytes) -> None:
        if self.container.running():
            self.container.write_stdin(sid, kind, payload)
