"""Exec sessions: processes exec'd in the container (and `cp`'s tar streams), each with its own stream id in the
agent, routed to and from the one client that started it."""

from __future__ import annotations

import itertools
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from micropod import guestmsg
from micropod.channel import FramedSocket
from micropod.errors import AgentError, printable
from micropod.monitor import api
from micropod.monitor.clients import Connections
from micropod.monitor.launch import MAIN, OnReply
from micropod.wire import GuestOp

FIRST_EXEC_SID = 2


@dataclass
class Session:
    """An exec'd process: its stream id in the agent, and the client that sees its output (if any)."""

    sid: int
    client: int | None
    started: bool = False
    container: str = MAIN  # the agent's id of the container it runs in


class AgentCall(Protocol):
    def __call__(self, op: str, reply: OnReply | None = None, **fields: Any) -> None:
        """Send a request to the agent; its answer, if wanted, comes to ``reply``."""


class ExecSessions:
    def __init__(self, clients: Connections, call_agent: AgentCall) -> None:
        self.clients = clients
        self.call_agent = call_agent
        self.by_sid: dict[int, Session] = {}
        self.sid_of_client: dict[int, int] = {}
        self._sids = itertools.count(FIRST_EXEC_SID)  # not reset by a restart

    def clear(self) -> None:
        self.by_sid.clear()
        self.sid_of_client.clear()

    def of_client(self, fd: int) -> Session | None:
        sid = self.sid_of_client.get(fd)
        return None if sid is None else self.by_sid[sid]

    def next_sid(self) -> int:
        """A stream id no session has had (a pod's containers take theirs from here too)."""
        return next(self._sids)

    def start(self, fd: int, detach: bool, agent_op: str, fields: dict[str, Any], container: str = MAIN) -> None:
        """A session routed between the client on ``fd`` (none if detached) and the agent."""
        if fd in self.sid_of_client:
            raise AgentError("this connection already runs an exec session")
        session = Session(next(self._sids), None if detach else fd, container=container)
        self.by_sid[session.sid] = session
        if not detach:
            self.sid_of_client[fd] = session.sid

        def started(reply: guestmsg.Reply) -> None:
            if reply.ok:
                session.started = True
                if session.sid not in self.by_sid:
                    return  # it has already ended (a cp-get streams everything before its reply)
                self._send(session, lambda c: c.send_control(api.exec_started_message(session.sid)), also=fd)
                return
            self.by_sid.pop(session.sid, None)
            self.sid_of_client.pop(fd, None)
            failure = api.exec_exit_message(reply.code or 125, printable(reply.message))
            self._send(session, lambda c: c.send_control(failure), also=fd)

        self.call_agent(agent_op, started, id=container, sid=session.sid, **fields)

    def output(self, sid: int, stream: int, payload: bytes) -> bool:
        """The session's stdout or stderr, for its client; False if there is no such session."""
        if sid not in self.by_sid:
            return False
        self._send(self.by_sid[sid], lambda c: c.send_data(stream, payload))
        return True

    def ended(self, sid: int, code: int, error: str | None = None) -> bool:
        """The session's process exited; False if there is no such session."""
        session = self.by_sid.pop(sid, None)
        if session is None:
            return False
        if session.client is not None:
            self.sid_of_client.pop(session.client, None)
        report = api.exec_exit_message(code, printable(error) if error else None)
        self._send(session, lambda c: c.send_control(report))
        return True

    def send_signal(self, fd: int, signum: int) -> None:
        """A signal from the client on ``fd`` for its session's process, once that runs."""
        session = self.by_sid.get(self.sid_of_client[fd])
        if session is not None and session.started:
            self.call_agent(GuestOp.SIGNAL, None, id=session.container, sid=session.sid, signal=signum)

    def hang_up(self, fd: int) -> None:
        """The client on ``fd`` went away."""
        sid = self.sid_of_client.pop(fd, None)
        session = self.by_sid.get(sid) if sid is not None else None
        if session is not None:
            # Like a terminal hanging up: the process hears SIGHUP, and its output goes nowhere.
            session.client = None
            if session.started:
                self.call_agent(GuestOp.SIGNAL, id=session.container, sid=session.sid, signal=int(signal.SIGHUP))

    def _send(self, session: Session, send: Callable[[FramedSocket], None], also: int | None = None) -> None:
        """To the session's client, or to ``also`` (the client that asked) once the session has none."""
        self.clients.send_to(session.client if session.client is not None else also, send)

