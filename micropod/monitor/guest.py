"""What the guest agent sends a monitor, routed: the main process's output to the container log and the attached
clients, an exec session's output to its client, and control messages (replies, exits, syslog, log lines) to where
they belong.

Whatever is malformed, or names a stream or session that does not exist, is refused (one rate-limited line in
monitor.log) and changes nothing: the guest is not trusted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from micropod import guestmsg, wire
from micropod.channel import Frame
from micropod.containerlog import ContainerLog
from micropod.errors import printable
from micropod.monitor.clients import Connections
from micropod.monitor.launch import MAIN_SID
from micropod.monitor.sessions import ExecSessions

log = logging.getLogger("micropod.monitor")


def route_frame(frame: Frame, output: Callable[[int, int, bytes], bool], sessions: ExecSessions,
                on_message: Callable[[guestmsg.GuestMessage], None]) -> None:
    """A frame from the agent: output to a container's main process (``output`` says whether ``sid`` was one)
    or to an exec session, a control message parsed for ``on_message``; anything else is refused."""
    kind, stream, payload = frame
    if kind == wire.DATA:
        sid, fd = wire.split_stream(stream)
        if fd not in (wire.STDOUT, wire.STDERR):
            guestmsg.refuse(f"data on stream {stream}, which is not an output stream")
        elif not output(sid, fd, payload) and not sessions.output(sid, fd, payload):
            guestmsg.refuse(f"data for session {sid}, which does not exist")
    elif kind == wire.CONTROL:
        try:
            on_message(guestmsg.parse(payload))
        except guestmsg.BadGuestMessage as exc:
            guestmsg.refuse(str(exc))
    # EOF frames: a session ends with its exit report, so the host needs none from the guest


class GuestEvents(Protocol):
    def deliver_reply(self, reply: guestmsg.Reply) -> None:
        """The agent's answer to a request of the current boot."""

    def main_exited(self, code: int) -> None:
        """The container's main process exited with ``code``."""


class GuestFrames:
    def __init__(self, container_log: ContainerLog, clients: Connections, sessions: ExecSessions,
                 events: GuestEvents) -> None:
        self.container_log = container_log
        self.clients = clients
        self.sessions = sessions
        self.events = events

    def on_frame(self, frame: Frame) -> None:
        route_frame(frame, self._main_output, self.sessions, self._on_message)

    def _main_output(self, sid: int, fd: int, payload: bytes) -> bool:
        if sid != MAIN_SID:
            return False
        self.container_log.write("stdout" if fd == wire.STDOUT else "stderr", payload)
        self.clients.to_attached(lambda c: c.send_data(fd, payload))
        return True

    def _on_message(self, message: guestmsg.GuestMessage) -> None:
        if isinstance(message, guestmsg.Reply):
            self.events.deliver_reply(message)
        elif isinstance(message, guestmsg.Exit) and message.sid == MAIN_SID:
            self.events.main_exited(message.code)
        elif isinstance(message, guestmsg.Exit):
            if not self.sessions.ended(message.sid, message.code, message.message):
                guestmsg.refuse(f"an exit of session {message.sid}, which does not exist")
        elif isinstance(message, guestmsg.Syslog):
            # The guest's /dev/log goes to the container log as its own stream; `logs` shows it on stderr.
            text = message.message.rstrip("\n") + "\n"
            self.container_log.write("syslog", text.encode(errors="surrogateescape"))
        elif isinstance(message, guestmsg.Log):
            log.info("agent: %s", printable(message.message))
