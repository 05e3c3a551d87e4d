"""The metadata service of one QEMU VM, in its monitor: HTTP on the bridge's gateway, with MMDS v2's rules.

Only the VM's own connections reach it: its TAP's ingress chain marks what the guest sends to
169.254.169.254:80, prerouting DNATs exactly those packets (by that mark, never by an address the guest
chose) to this server's port, and the host's input chain drops whatever else is sent to that port, from
another VM or from the host's own users over loopback; last, the server answers no peer but the VM's address,
which no unprivileged host process can take as its source (README's security model).

Every request is bounded: its head in size and time, and the connections in number. Session tokens are
stateless (an HMAC of their expiry under a secret of this server's), so no guest can grow the monitor's
memory by asking for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from micropod.errors import UsageError
from micropod.metadata import tree
from micropod.metadata.keyring import b64url

log = logging.getLogger("micropod.monitor")

MAX_HEAD = 8 << 10
MAX_HEADERS = 64
REQUEST_TIMEOUT = 5.0  # seconds for a whole request head; a guest that dawdles loses its connection
MAX_CONNECTIONS = 8
MIN_TTL, MAX_TTL = 1, 21600
TOKEN_HEADERS = ("x-metadata-token", "x-aws-ec2-metadata-token")
TTL_HEADERS = ("x-metadata-token-ttl-seconds", "x-aws-ec2-metadata-token-ttl-seconds")
MAX_TOKEN = 128
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
           500: "Internal Server Error"}


class SessionTokens:
    """``PUT /latest/api/token``'s tokens: ``<expiry ms>.<HMAC>``, on the monitor's monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._secret = secrets.token_bytes(32)
        self._clock = clock

    def _mac(self, expiry: str) -> str:
        return b64url(hmac.new(self._secret, expiry.encode(), hashlib.sha256).digest())

    def issue(self, ttl: int) -> str:
        expiry = str(int((self._clock() + ttl) * 1000))
        return f"{expiry}.{self._mac(expiry)}"

    def valid(self, token: str) -> bool:
        expiry, _, mac = token.partition(".")
        if not expiry.isdigit() or len(token) > MAX_TOKEN or not hmac.compare_digest(mac, self._mac(expiry)):
            return False
        return self._clock() * 1000 < int(expiry)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names in lower case; a repeated header keeps its last value


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {REASONS[self.status]}", f"Content-Type: {self.content_type}",
                 f"Content-Length: {len(self.body)}", "Connection: close", "Server: micropod-metadata",
                 *(f"{name}: {value}" for name, value in self.headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


class BadRequest(Exception):
    pass


def parse(head: bytes) -> Request:
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("the request is not ASCII") from None
    request_line, *header_lines = text.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise BadRequest("malformed request line")
    if len(header_lines) > MAX_HEADERS:
        raise BadRequest("too many headers")
    headers = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest("malformed header")
        headers[name.lower()] = value.strip()
    target = urlsplit(parts[1])
    try:
        query = parse_qs(target.query, max_num_fields=8)
    except ValueError:
        raise BadRequest("too many query fields") from None
    return Request(parts[0], target.path, query, headers)


def _header(request: Request, names: tuple[str, ...]) -> str | None:
    return next((request.headers[name] for name in names if name in request.headers), None)


class Handler:
    """What one request gets: pure, for the server's threads and for tests alike."""

    def __init__(self, content: Callable[[], tree.Tree], credential: Callable[[str], str],
                 tokens: SessionTokens) -> None:
        self.content = content
        self.credential = credential
        self.tokens = tokens

    def respond(self, request: Request) -> Response:
        if request.method == "PUT":
            if request.path.rstrip("/") != "/latest/api/token":
                return Response(405, b"Only the session token is PUT.", headers=(("Allow", "GET"),))
            return self._token(request)
        if request.method != "GET":
            return Response(405, b"Not allowed HTTP method.", headers=(("Allow", "GET, PUT"),))
        token = _header(request, TOKEN_HEADERS)
        if token is None:
            return Response(401, b"No MMDS token provided. Use `X-metadata-token` header to specify the "
                                 b"session token.")
        if not self.tokens.valid(token):
            return Response(401, b"MMDS token not valid.")
        as_json = "application/json" in request.headers.get("accept", "")
        if request.path.rstrip("/") == "/latest/credentials/jwt":
            audiences = request.query.get("audience", [])
            if len(audiences) > 1:
                return Response(400, b"Give one audience.")
            try:
                jwt = self.credential(audiences[0] if audiences else "")
            except UsageError as exc:
                return Response(400, str(exc).encode())
            return Response(200, *tree.render(jwt, as_json))
        try:
            node = tree.lookup(self.content(), request.path)
        except KeyError:
            return Response(404, f"Resource not found: {request.path[:200]}.".encode())
        return Response(200, *tree.render(node, as_json))

    def _token(self, request: Request) -> Response:
        if "x-forwarded-for" in request.headers:
            # IMDSv2's rule: a PUT that came through a proxy is refused, so an SSRF cannot get a token
            return Response(400, b"Requests with X-Forwarded-For are not allowed.")
        ttl = _header(request, TTL_HEADERS)
        if ttl is None:
            return Response(400, b"Token time to live value not found. Use `X-metadata-token-ttl-seconds` header "
                                 b"to specify the token's lifetime.")
        if not ttl.isdigit() or not MIN_TTL <= int(ttl) <= MAX_TTL:
            return Response(400, f"Invalid time to live value provided for token: {ttl[:20]}. Please provide a "
                                 f"value between {MIN_TTL} and {MAX_TTL}.".encode())
        return Response(200, self.tokens.issue(int(ttl)).encode(), headers=(("X-metadata-token-ttl-seconds", ttl),))


def read_head(conn: socket.socket, deadline: float) -> bytes:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        left = deadline - time.monotonic()
        if left <= 0 or len(buffer) > MAX_HEAD:
            raise BadRequest("the request head is too slow or too long")
        conn.settimeout(left)
        chunk = conn.recv(4096)
        if not chunk:
            raise BadRequest("the connection closed mid-request")
        buffer += chunk
    return buffer.split(b"\r\n\r\n", 1)[0]


class MetadataServer:
    """Accepts on ``listener`` (already bound to the gateway and the bridge) in a thread of its own; each
    connection gets one answer and is closed. ``peer`` is the VM's address: a connection from elsewhere,
    which the firewall should already have dropped, is closed unanswered."""

    def __init__(self, listener: socket.socket, handler: Handler, peer: str) -> None:
        self.listener = listener
        self.handler = handler
        self.peer = peer
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._thread = threading.Thread(target=self._accept_loop, name="metadata", daemon=True)
        self._closing = False

    @property
    def port(self) -> int:
        port: int = self.listener.getsockname()[1]
        return port

    def start(self) -> None:
        self.listener.listen(MAX_CONNECTIONS)
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        if self._thread.is_alive():
            self._thread.join(timeout=REQUEST_TIMEOUT)

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                conn, address = self.listener.accept()
            except OSError:
                return
            if address[0] != self.peer:
                log.warning("metadata: a connection from %s, not the VM, closed", address[0])
                conn.close()
            elif not self._slots.acquire(blocking=False):
                conn.close()  # the guest's own connections are all in use; it waits for none of them
            else:
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                try:
                    response = self.handler.respond(parse(read_head(conn, time.monotonic() + REQUEST_TIMEOUT)))
                except BadRequest as exc:
                    response = Response(400, f"{exc}.".encode())
                except (OSError, TimeoutError):
                    return
                except Exception:  # a bug of ours must not end the thread's slot unanswered
                    log.exception("metadata: the request failed")
                    response = Response(500, b"Internal error.")
                conn.settimeout(REQUEST_TIMEOUT)
                with contextlib.suppress(OSError):
                    conn.sendall(response.encode())
        finally:
            self._slots.release()
