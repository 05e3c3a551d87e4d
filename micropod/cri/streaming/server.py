"""The streaming HTTP server: single-use tokens minted by Exec, Attach and PortForward, and the upgrade of a
request that presents one to SPDY/3.1 or WebSocket, with the subprotocol negotiated as kubelet's server does.

It listens on loopback by default (containerd's stream_server_address); a token is the only credential, so each is
unguessable, used once, and forgotten after a minute.
"""

from __future__ import annotations

import http.server
import logging
import secrets
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from typing import Any

from micropod.context import Context
from micropod.cri.streaming import portforward, transports
from micropod.cri.streaming.remotecommand import SPDY_PROTOCOLS, WEBSOCKET_PROTOCOLS, Request
from micropod.paths import StateRoot

log = logging.getLogger("micropod.cri")

TOKEN_TTL = 60.0
MAX_PENDING = 1024
MAX_SESSIONS = 64
MAX_CONNECTIONS = 128  # before a token is shown too: each holds a thread
MAX_HEADER_LINE = 8192
HEAD_TIMEOUT = 10.0  # for the whole head, however slowly it trickles in


@dataclass(frozen=True)
class Pending:
    request: Request | portforward.Request
    expires: float


class Tokens:
    def __init__(self) -> None:
        self._pending: dict[str, Pending] = {}
        self._lock = threading.Lock()

    def mint(self, request: Request | portforward.Request) -> str:
        token = secrets.token_urlsafe(24)
        now = time.monotonic()
        with self._lock:
            self._pending = {k: v for k, v in self._pending.items() if v.expires > now}
            if len(self._pending) >= MAX_PENDING:
                raise OverflowError("too many streaming requests are waiting for their client")
            self._pending[token] = Pending(request, now + TOKEN_TTL)
        return token

    def take(self, token: str) -> Request | portforward.Request | None:
        with self._lock:
            pending = self._pending.pop(token, None)
        if pending is None or pending.expires < time.monotonic():
            return None
        return pending.request


class HeadTooSlow(OSError):
    pass


class HeadReader:
    """The request's head off the socket a line at a time, within one deadline for all of it and at most
    MAX_HEADER_LINE bytes a line. It reads only up to each line's end (peeking for it), so whatever the client
    sent after the head is still in the socket for the upgraded session."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline

    def readline(self, limit: int = -1) -> bytes:
        line = b""
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise HeadTooSlow("the request's head did not arrive in time")
            self.sock.settimeout(remaining)
            peeked = self.sock.recv(MAX_HEADER_LINE + 1 - len(line), socket.MSG_PEEK)
            if not peeked:
                return line
            end = peeked.find(b"\n")
            line += self.sock.recv(len(peeked) if end < 0 else end + 1)
            if end >= 0 or (0 <= limit <= len(line)):
                return line
            if len(line) > MAX_HEADER_LINE:
                raise HeadTooSlow(f"a line of the request's head is longer than {MAX_HEADER_LINE} bytes")

    def close(self) -> None:
        pass


class _Handler(http.server.BaseHTTPRequestHandler):
    server: StreamServer
    protocol_version = "HTTP/1.1"
    rbufsize = 0  # unbuffered: after the upgrade, every byte the client sent is still in the socket
    timeout = HEAD_TIMEOUT  # a session, once upgraded, has none

    def setup(self) -> None:
        super().setup()
        self.rfile = HeadReader(self.connection, time.monotonic() + self.server.head_timeout)  # type: ignore[assignment]

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("stream %s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._stream()

    def do_POST(self) -> None:
        self._stream()

    def _stream(self) -> None:
        self.close_connection = True
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        if len(parts) != 2 or parts[0] not in ("exec", "attach", "portforward"):
            self._refuse(404, "not found")
            return
        if not self.server.sessions.acquire(blocking=False):
            self._refuse(503, "too many streaming sessions")
            return
        try:
            request = self.server.tokens.take(parts[1])
            kind_ok = request is not None and (parts[0] == "portforward") == isinstance(request, portforward.Request)
            if request is None or not kind_ok:
                self._refuse(404, "token not found or expired")
                return
            self._upgrade(request)
        finally:
            self.server.sessions.release()

    def _upgrade(self, request: Request | portforward.Request) -> None:
        upgrade = (self.headers.get("Upgrade") or "").lower()
        ctx = Context(self.server.root)
        if upgrade == "websocket":
            offered = [p.strip() for h in self.headers.get_all("Sec-WebSocket-Protocol") or [] for p in h.split(",")]
            accepted: tuple[str, ...] = portforward.WEBSOCKET_PROTOCOLS \
                if isinstance(request, portforward.Request) else WEBSOCKET_PROTOCOLS
            chosen = next((p for p in offered if p in accepted), None)
            key = self.headers.get("Sec-WebSocket-Key")
            if chosen is None or not key:
                self._refuse(400, f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
                                  f"server accepts {list(accepted)}")
                return
            from micropod.cri.streaming.websocket import accept_key

            self._switch({"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Accept": accept_key(key),
                          "Sec-WebSocket-Protocol": chosen})
            transports.serve_websocket(ctx, self.connection, chosen, request)
        elif upgrade.startswith("spdy/3"):
            offered = [p.strip() for h in self.headers.get_all("X-Stream-Protocol-Version") or [] for p in h.split(",")]
            accepted = (portforward.SPDY_PROTOCOL,) if isinstance(request, portforward.Request) else SPDY_PROTOCOLS
            chosen = next((p for p in accepted if p in offered), None)
            if chosen is None:
                self._refuse(403, f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
                                  f"server accepts {list(accepted)}")
                return
            self._switch({"Upgrade": "SPDY/3.1", "Connection": "Upgrade", "X-Stream-Protocol-Version": chosen})
            transports.serve_spdy(ctx, self.connection, chosen, request)
        else:
            self._refuse(400, "Upgrade request required")

    def _switch(self, headers: dict[str, str]) -> None:
        self.send_response(101, "Switching Protocols")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.flush()
        self.connection.settimeout(None)

    def _refuse(self, code: int, message: str) -> None:
        body = (message + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class StreamServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], root: StateRoot, max_connections: int = MAX_CONNECTIONS,
                 head_timeout: float = HEAD_TIMEOUT) -> None:
        super().__init__(address, _Handler)
        self.root = root
        self.tokens = Tokens()
        self.sessions = threading.BoundedSemaphore(MAX_SESSIONS)
        self.connections = threading.BoundedSemaphore(max_connections)
        self.head_timeout = head_timeout

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread for the connection, if fewer than the cap hold one; else it is closed at once."""
        if not self.connections.acquire(blocking=False):
            log.warning("stream %s: too many connections; closed", client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("stream %s: connection ended in error", client_address[0], exc_info=True)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        text = host.decode() if isinstance(host, bytes) else str(host)
        shown = f"[{text}]" if ":" in text else text
        return f"http://{shown}:{port}"

    def url(self, kind: str, request: Request | portforward.Request) -> str:
        return f"{self.base_url}/{kind}/{self.tokens.mint(request)}"

    def start(self) -> None:
        threading.Thread(target=self.serve_forever, name="cri-stream", daemon=True).start()
