"""Kubernetes' remotecommand protocol, whatever carries it: a container's exec session (or its main process, for
attach) bridged to the client's stdin, stdout, stderr, error and resize channels, through the container's monitor.

The error channel ends every session: from v4 on, a metav1.Status as JSON (Success, or Failure with the exit code
as a NonZeroExitCode cause); before v4, only a failure's message as text.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from micropod.context import Context
from micropod.errors import MicropodError
from micropod.monitor.api import Op
from micropod.monitor.client import MonitorClient

SPDY_PROTOCOLS = ("v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io")
WEBSOCKET_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io",
                       "base64.channel.k8s.io", "channel.k8s.io")
MAX_RESIZE_BUFFER = 4096


@dataclass(frozen=True)
class Request:
    """What the CRI's Exec or Attach call asked for, kept behind its single-use token."""

    kind: str  # "exec" or "attach"
    container_id: str
    cmd: tuple[str, ...] = ()
    tty: bool = False
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True


class Sink(Protocol):
    def output(self, stream: int, data: bytes) -> None:
        """Stream 1 or 2 to the client's stdout or stderr channel."""

    def finish(self, status: dict[str, Any]) -> None:
        """The error channel's last word, then the end of the connection."""


def status_of(code: int | None, error: str | None, cmd: tuple[str, ...]) -> dict[str, Any]:
    if error is None and (code is None or code == 0):
        return {"metadata": {}, "status": "Success"}
    if error is not None and code in (None, 125):
        return {"metadata": {}, "status": "Failure", "message": error, "reason": "InternalError", "code": 500}
    return {"metadata": {}, "status": "Failure",
            "message": f"command terminated with non-zero exit code: error executing command {list(cmd)}, "
                       f"exit code {code}",
            "reason": "NonZeroExitCode", "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


def error_channel_bytes(protocol: str, status: dict[str, Any]) -> bytes:
    """v4 and later: the Status; older ones: a failure's message alone (nothing for success)."""
    if protocol.startswith(("v4.", "v5.")):
        return json.dumps(status).encode()
    return b"" if status["status"] == "Success" else str(status.get("message", "")).encode()


class Disconnected(Exception):
    """The client went away: the session stops relaying (an exec'd process goes on, as with kubelet)."""


class Bridge:
    """The client's side of a monitor session: its stdin through a socket pair that MonitorClient.interact reads,
    its resizes and its disconnect through a wakeup pipe."""

    def __init__(self) -> None:
        self._stdin_out, self.stdin_in = socket.socketpair()
        self.wake_read, self._wake_write = os.pipe()
        self._size: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.gone = False

    def feed_stdin(self, data: bytes | None) -> None:
        with contextlib.suppress(OSError):
            if data is None:
                self._stdin_out.shutdown(socket.SHUT_WR)
            else:
                self._stdin_out.sendall(data)

    def resize(self, width: int, height: int) -> None:
        if 0 < width < 1 << 16 and 0 < height < 1 << 16:
            with self._lock:
                self._size = (height, width)
            self._wake(b"r")

    def disconnect(self) -> None:
        self.gone = True
        self._wake(b"q")

    def _wake(self, what: bytes) -> None:
        with self._lock, contextlib.suppress(OSError):  # never a write to a closed (and reused) descriptor
            if not self._closed:
                os.write(self._wake_write, what)

    def on_wakeup(self, client: MonitorClient) -> Callable[[bytes], None]:
        def handle(data: bytes) -> None:
            if b"q" in data:
                raise Disconnected
            with self._lock:
                size, self._size = self._size, None
            if size is not None:
                with contextlib.suppress(MicropodError):
                    client.request(Op.RESIZE, rows=size[0], cols=size[1])

        return handle

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for closer in (self._stdin_out.close, self.stdin_in.close, lambda: os.close(self.wake_read),
                       lambda: os.close(self._wake_write)):
            with contextlib.suppress(OSError):
                closer()


class ResizeDecoder:
    """The resize channel: JSON objects ({"Width": W, "Height": H}) back to back, possibly split across reads."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.buffer = ""

    def feed(self, data: bytes | None) -> None:
        if data is None:
            return
        self.buffer += data.decode(errors="replace")
        decoder = json.JSONDecoder()
        while self.buffer.strip():
            try:
                value, end = decoder.raw_decode(self.buffer.lstrip())
            except ValueError:
                if len(self.buffer) > MAX_RESIZE_BUFFER:
                    self.buffer = ""  # garbage: dropped, never grown without bound
                return
            self.buffer = self.buffer.lstrip()[end:]
            if isinstance(value, dict):
                width, height = value.get("Width"), value.get("Height")
                if type(width) is int and type(height) is int:
                    self.bridge.resize(width, height)


def run(ctx: Context, request: Request, bridge: Bridge, sink: Sink) -> None:
    """The session, until the process (or the container, for attach) ends or the client goes."""
    record = ctx.state.get(request.container_id)
    if record is None or record.status != "running":
        sink.finish(status_of(None, f"container {request.container_id} is not running", request.cmd))
        return
    try:
        client = MonitorClient.of(ctx.root, record)
    except MicropodError as exc:
        sink.finish(status_of(None, str(exc), request.cmd))
        return
    try:
        message = _relay(client, request, bridge, sink)
    except Disconnected:
        return
    except MicropodError as exc:
        sink.finish(status_of(None, str(exc), request.cmd))
        return
    finally:
        client.close()
    if message["op"] == Op.ERROR:
        sink.finish(status_of(None, str(message.get("message")), request.cmd))
    elif request.kind == "attach" or message["op"] == Op.EXEC_EXIT:
        sink.finish(status_of(int(message.get("code", 0)) if request.kind == "exec" else 0,
                              message.get("error") if request.kind == "exec" else None, request.cmd))
    else:
        sink.finish(status_of(None, str(message.get("error") or "the container stopped"), request.cmd))


def _relay(client: MonitorClient, request: Request, bridge: Bridge, sink: Sink) -> dict[str, Any]:
    def on_data(stream: int, data: bytes) -> None:
        if (stream == 2 and request.stderr) or (stream != 2 and request.stdout):
            sink.output(2 if stream == 2 and not request.tty else 1, data)

    stdin = bridge.stdin_in.fileno() if request.stdin else None
    wakeup = bridge.on_wakeup(client)
    if request.kind == "exec":
        spec = {"args": list(request.cmd), "env": [], "user": "", "cwd": "", "tty": request.tty,
                "stdin": request.stdin}
        client.request(Op.EXEC, spec=spec, detach=False)
        started = client.interact(on_data, until=(Op.EXEC_STARTED, Op.EXEC_EXIT, Op.ERROR), wakeup=bridge.wake_read,
                                  on_wakeup=wakeup)
        if started["op"] != Op.EXEC_STARTED:
            return started
        return client.interact(on_data, until=(Op.EXEC_EXIT,), stdin=stdin, wakeup=bridge.wake_read,
                               on_wakeup=wakeup)
    client.request(Op.ATTACH)
    return client.interact(on_data, until=(), stdin=stdin, wakeup=bridge.wake_read, on_wakeup=wakeup)
