"""The agent's side of the channel to the host: ``hello`` to each host that connects, frames in and
out, and what happens while no host is there."""

from __future__ import annotations

import select
import time

from micropod import wire
from micropod.agent import channel as channels
from micropod.agent.console import console

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol

    class LinkOwner(Protocol):
        """What the link needs of the agent (micropod/agent/main.py), which imports this module."""

        def watch(self, fd: int, events: int) -> None: ...
        def log(self, message: str) -> None: ...
        def on_request(self, message: dict[str, Any]) -> None: ...
        def on_stdin(self, kind: int, stream: int, payload: bytes) -> None: ...

_REATTACH_DELAY = 1.0


class HostLink:
    def __init__(self, agent: LinkOwner) -> None:
        self.agent = agent
        self.channel: channels.Channel | None = None
        self.listener: channels.VsockListener | None = None
        self.idle_serial: channels.Channel | None = None
        self.reattach_at: float | None = None
        self.loss_reported = False

    def owns(self, fd: int) -> bool:
        return (self.channel is not None and fd == self.channel.fd) or (
            self.listener is not None and fd == self.listener.fd)

    def on_ready(self, fd: int) -> None:
        if self.channel is not None and fd == self.channel.fd:
            self.on_readable()
        elif self.listener is not None:
            if self.channel is None:
                self.attach(self.listener.accept())
            else:
                self.listener.accept().close()  # one host at a time

    def listen(self, listener: channels.VsockListener) -> None:
        self.listener = listener
        self.attach(listener.accept())
        self.agent.watch(listener.fd, select.EPOLLIN)

    def send(self, frame: bytes) -> None:
        if self.channel is None:
            return
        try:
            self.channel.send(frame)
        except channels.ChannelLost as exc:
            self.lost(str(exc))

    def attach(self, channel: channels.Channel) -> None:
        """Greet a newly connected host; hello is always its first frame."""
        self.channel = channel
        self.agent.watch(channel.fd, select.EPOLLIN)
        try:
            # Unbounded: a virtio-serial port is writable only once the host side has connected.
            hello = {"op": wire.GuestOp.HELLO, "version": wire.VERSION,
                     "uptime": time.clock_gettime(time.CLOCK_BOOTTIME)}
            channel.send(wire.encode_control(hello), stall_timeout=None)
        except channels.ChannelLost as exc:
            self.lost(str(exc))

    def lost(self, reason: str) -> None:
        """Output is dropped from here on; the loop shuts down in test mode or waits for the host."""
        channel, self.channel = self.channel, None
        if channel is None:
            return
        if not self.loss_reported:
            # The serial port keeps reading as EOF while no host is connected: say it once.
            console(f"channel to the host lost: {reason}")
            self.loss_reported = True
        self.agent.watch(channel.fd, 0)
        if channel.kind == "serial":
            # The port stays ours; it reads as EOF until the host side is connected again.
            self.idle_serial = channel
            self.reattach_at = time.monotonic() + _REATTACH_DELAY
        else:
            channel.close()

    def on_timer(self, now: float) -> None:
        if self.reattach_at is not None and now >= self.reattach_at and self.idle_serial is not None:
            self.reattach_at = None
            self.channel, self.idle_serial = self.idle_serial, None
            self.agent.watch(self.channel.fd, select.EPOLLIN)

    def on_readable(self) -> None:
        assert self.channel is not None
        data = self.channel.read()
        if data is None:
            return
        if not data:
            self.lost("the host closed it")
            return
        try:
            frames = self.channel.reader.feed(data)
        except wire.FrameError as exc:
            self.lost(str(exc))
            return
        for kind, stream, payload in frames:
            if kind == wire.CONTROL:
                try:
                    message = wire.decode_control(payload)
                except wire.FrameError as exc:
                    self.agent.log(f"ignored a control frame: {exc}")
                    continue
                self.agent.on_request(message)
            else:
                self.agent.on_stdin(kind, stream, payload)
