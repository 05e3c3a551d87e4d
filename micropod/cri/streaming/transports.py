"""The remotecommand and portforward protocols on their two transports: SPDY streams named by a ``streamtype``
header, or WebSocket messages whose first byte names the channel."""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
from typing import Any

from micropod.context import Context
from micropod.cri.streaming import portforward
from micropod.cri.streaming.remotecommand import Bridge, Request, ResizeDecoder, error_channel_bytes, run
from micropod.cri.streaming.spdy import Session, Stream
from micropod.cri.streaming.websocket import BINARY, TEXT, WebSocket, WebSocketError

STREAMS_TIMEOUT = 30.0  # for the client to open every stream it asked for, as kubelet waits
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
REMOTECOMMAND_STREAMS = frozenset({"error", "stdin", "stdout", "stderr", "resize"})


def expected_streams(request: Request, protocol: str) -> set[str]:
    wanted = {"error"}
    if request.stdin:
        wanted.add("stdin")
    if request.stdout:
        wanted.add("stdout")
    if request.stderr and not request.tty:
        wanted.add("stderr")
    if request.tty and protocol not in ("channel.k8s.io", "v2.channel.k8s.io"):
        wanted.add("resize")
    return wanted


def _pump(read: Any, feed: Any) -> threading.Thread:
    def loop() -> None:
        while (data := read()) is not None:
            feed(data)
        feed(None)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


class _SpdySink:
    def __init__(self, session: Session, streams: dict[str, Stream], protocol: str) -> None:
        self.session, self.streams, self.protocol = session, streams, protocol

    def output(self, stream: int, data: bytes) -> None:
        target = self.streams.get("stderr" if stream == 2 else "stdout")
        if target is not None:
            target.write(data)

    def finish(self, status: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            message = error_channel_bytes(self.protocol, status)
            if message:
                self.streams["error"].write(message)
            for stream in self.streams.values():
                stream.close()


def serve_spdy(ctx: Context, sock: socket.socket, protocol: str, request: Request | portforward.Request) -> None:
    if isinstance(request, portforward.Request):
        portforward.serve_spdy(ctx, sock, request)
        return
    opened: dict[str, Stream] = {}
    ready = threading.Event()
    wanted = expected_streams(request, protocol)

    def on_stream(stream: Stream) -> None:
        kind = stream.header("streamtype")
        if kind not in REMOTECOMMAND_STREAMS or kind in opened:  # held for the session's life: known ones, once
            session.reset(stream)
            return
        opened[kind] = stream
        if wanted <= set(opened):
            ready.set()

    session = Session(sock, on_stream)

    def serve() -> None:
        session.serve()
        ready.set()  # a session that ended (a broken or vanished client) stops the wait for its streams too

    reader = threading.Thread(target=serve, daemon=True)
    reader.start()
    bridge = Bridge()
    try:
        if not ready.wait(STREAMS_TIMEOUT) or session.ended.is_set():
            return
        if "stdin" in opened:
            _pump(opened["stdin"].read, bridge.feed_stdin)
        if "resize" in opened:
            decoder = ResizeDecoder(bridge)
            _pump(opened["resize"].read, decoder.feed)

        def hang_up() -> None:
            session.ended.wait()
            bridge.disconnect()

        threading.Thread(target=hang_up, daemon=True).start()
        run(ctx, request, bridge, _SpdySink(session, opened, protocol))
    finally:
        session.close()
        reader.join(5)
        bridge.close()


class _WebSocketSink:
    def __init__(self, ws: WebSocket, protocol: str) -> None:
        self.ws, self.protocol = ws, protocol
        self.base64 = "base64" in protocol

    def send(self, channel: int, data: bytes) -> None:
        if self.base64:
            self.ws.send(TEXT, str(channel).encode() + base64.b64encode(data))
        else:
            self.ws.send(BINARY, bytes([channel]) + data)

    def output(self, stream: int, data: bytes) -> None:
        self.send(STDERR if stream == 2 else STDOUT, data)

    def finish(self, status: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            message = error_channel_bytes(self.protocol, status)
            if message:
                self.send(ERROR, message)
            self.ws.close()


def serve_websocket(ctx: Context, sock: socket.socket, protocol: str,
                    request: Request | portforward.Request) -> None:
    if isinstance(request, portforward.Request):
        portforward.serve_websocket(ctx, sock, request)
        return
    ws = WebSocket(sock)
    bridge = Bridge()
    decoder = ResizeDecoder(bridge)
    is_base64 = "base64" in protocol

    def read() -> None:
        try:
            while (message := ws.receive()) is not None:
                _, payload = message
                if is_base64:
                    if not payload:
                        continue
                    channel, data = payload[0] - ord("0"), base64.b64decode(payload[1:], validate=False)
                elif payload:
                    channel, data = payload[0], payload[1:]
                else:
                    continue
                if channel == STDIN and request.stdin:
                    bridge.feed_stdin(data)
                elif channel == RESIZE:
                    decoder.feed(data)
                elif channel == CLOSE and data[:1] == bytes([STDIN]):  # v5: the client closed its stdin
                    bridge.feed_stdin(None)
        except (OSError, EOFError, ValueError, WebSocketError):
            pass
        finally:
            bridge.disconnect()

    threading.Thread(target=read, daemon=True).start()
    try:
        run(ctx, request, bridge, _WebSocketSink(ws, protocol))
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        bridge.close()
