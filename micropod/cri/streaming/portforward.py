"""portforward.k8s.io: each TCP connection the client forwards is a pair of streams (data and error) that name
the port; the server connects to that port of the sandbox and copies both ways.

The connection goes to the sandbox VM's address on micropod's bridge (where containerd dials inside the pod's
network namespace, micropod's host has only the VM's NIC), so a server in the pod must listen on that address or
on all of them; a sandbox with no network cannot be forwarded to.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass

from micropod.context import Context
from micropod.cri.streaming.spdy import Session, Stream
from micropod.cri.streaming.websocket import BINARY, WebSocket, WebSocketError
from micropod.errors import MicropodError

SPDY_PROTOCOL = "portforward.k8s.io"
WEBSOCKET_PROTOCOLS = ("v4.channel.k8s.io", "portforward.k8s.io")
CONNECT_TIMEOUT = 10.0
PAIR_TIMEOUT = 30.0
MAX_UNPAIRED = 32  # error streams and data streams that wait for their pair, each, in a session


@dataclass(frozen=True)
class Request:
    sandbox_id: str
    ports: tuple[int, ...]  # empty: any port the client names


def target_address(ctx: Context, request: Request) -> str:
    from micropod.service import pods

    pod = ctx.pods.get(request.sandbox_id)
    if pod is None or pod.status != "running":
        raise MicropodError(f"sandbox {request.sandbox_id} is not running")
    address = pods.config(ctx, pod).network.ip
    if not address:
        raise MicropodError(f"sandbox {request.sandbox_id} has no network to forward a port to")
    return address


def _port(text: str, request: Request) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 1 << 16:  # isdigit() alone takes '²'
        raise MicropodError(f"invalid port {text!r}")
    port = int(text)
    if request.ports and port not in request.ports:
        raise MicropodError(f"port {port} was not asked for in PortForward")
    return port


def _copy_out(sock: socket.socket, write: object, close: object) -> None:
    assert callable(write) and callable(close)
    with contextlib.suppress(OSError):
        while data := sock.recv(1 << 15):
            write(data)
    with contextlib.suppress(OSError):
        close()


def _forward_spdy(ctx: Context, request: Request, data: Stream, error: Stream) -> None:
    port_text = data.header("port")
    try:
        port = _port(port_text, request)
        target = socket.create_connection((target_address(ctx, request), port), timeout=CONNECT_TIMEOUT)
    except (MicropodError, OSError) as exc:
        with contextlib.suppress(OSError):
            error.write(f"error forwarding port {port_text} to pod {request.sandbox_id}: {exc}".encode())
            error.close()
            data.close()
        return
    target.settimeout(None)
    reader = threading.Thread(target=_copy_out, args=(target, data.write, data.close), daemon=True)
    reader.start()
    with contextlib.suppress(OSError):
        while (chunk := data.read()) is not None:
            target.sendall(chunk)
        target.shutdown(socket.SHUT_WR)
    reader.join()
    target.close()
    with contextlib.suppress(OSError):
        error.close()


def serve_spdy(ctx: Context, sock: socket.socket, request: Request) -> None:
    errors: dict[str, Stream] = {}
    lock = threading.Lock()
    arrived = threading.Condition(lock)

    waiting = [0]  # data streams waiting for their error stream

    def on_stream(stream: Stream) -> None:
        kind, request_id = stream.header("streamtype"), stream.header("requestid")
        with arrived:
            # what waits to be paired is bounded: error streams kept, data streams with a thread each
            if kind == "error":
                refused = request_id in errors or len(errors) >= MAX_UNPAIRED
            else:
                refused = kind != "data" or waiting[0] >= MAX_UNPAIRED
            if not refused and kind == "error":
                errors[request_id] = stream
                arrived.notify_all()
            elif not refused:
                waiting[0] += 1
        if refused:
            session.reset(stream)
        elif kind == "data":
            threading.Thread(target=pair_and_forward, args=(stream, request_id), daemon=True).start()

    def pair_and_forward(data: Stream, request_id: str) -> None:
        with arrived:
            arrived.wait_for(lambda: request_id in errors or session.ended.is_set(), PAIR_TIMEOUT)
            error = errors.pop(request_id, None)
            waiting[0] -= 1
        if error is None:
            with contextlib.suppress(OSError):
                data.close()
            return
        _forward_spdy(ctx, request, data, error)

    session = Session(sock, on_stream)
    try:
        session.serve()
    finally:
        session.close()


def serve_websocket(ctx: Context, sock: socket.socket, request: Request) -> None:
    """Channels 2i (data) and 2i+1 (error) for the i-th asked-for port; each opens with the port, little-endian."""
    ws = WebSocket(sock)
    targets: dict[int, socket.socket] = {}
    try:
        for index, port in enumerate(request.ports):
            for channel in (2 * index, 2 * index + 1):
                ws.send(BINARY, bytes([channel]) + struct.pack("<H", port))
            try:
                target = socket.create_connection((target_address(ctx, request), port), timeout=CONNECT_TIMEOUT)
            except (MicropodError, OSError) as exc:
                ws.send(BINARY, bytes([2 * index + 1]) + f"error forwarding port {port}: {exc}".encode())
                continue
            target.settimeout(None)
            targets[2 * index] = target
            channel_byte = bytes([2 * index])
            threading.Thread(target=_copy_out, args=(target, lambda d, c=channel_byte: ws.send(BINARY, c + d),
                                                     lambda: None), daemon=True).start()
        while (message := ws.receive()) is not None:
            payload = message[1]
            if payload and payload[0] in targets:
                targets[payload[0]].sendall(payload[1:])
    except (OSError, EOFError, WebSocketError):
        pass
    finally:
        for target in targets.values():
            target.close()
        ws.close()
