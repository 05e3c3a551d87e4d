"""Test registries: Debian's docker-registry on 127.0.0.1 (plain, htpasswd basic auth, TLS from a
throwaway CA), and a small HTTP front (token auth and fault injection) that serves the real registry's
bytes. Every wait is bounded and shows the registry's log tail when it runs out."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import http.server
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from micropod import proc

REGISTRY_BIN = "/usr/bin/docker-registry"
USER, PASSWORD = "tester", "s3cret-pw"
READY_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Tls:
    ca: Path
    cert: Path
    key: Path


def make_tls(workdir: Path) -> Tls:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost, through the openssl CLI."""
    workdir.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (workdir / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = workdir / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")
    proc.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
              "-days", "2", "-subj", "/CN=micropod test CA"])
    proc.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
              "-subj", "/CN=127.0.0.1"])
    proc.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
              "-out", cert, "-days", "2", "-extfile", ext])
    return Tls(ca, cert, key)


def htpasswd_file(path: Path, user: str = USER, password: str = PASSWORD) -> Path:
    import bcrypt

    path.write_bytes(user.encode() + b":" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)) + b"\n")
    return path


@dataclass
class RunningRegistry:
    host: str  # 127.0.0.1:PORT
    child: subprocess.Popen[bytes]
    log: Path
    tls: Tls | None = None
    basic_auth: bool = False

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait(timeout=10)

    def put_raw(self, repo: str, tag: str, blobs: list[tuple[bytes, str]]) -> bytes:
        """Upload `blobs` (config first, then layers; (bytes, media type)) and an OCI manifest naming them
        as they are, sizes included: what skopeo would refuse to push (a 5 MiB config). The manifest."""
        descriptors = []
        for data, media_type in blobs:
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            location = _http(self.host, "POST", f"/v2/{repo}/blobs/uploads/", b"", 202)
            _http(self.host, "PUT", f"{location}{'&' if '?' in location else '?'}digest={digest}", data, 201)
            descriptors.append({"mediaType": media_type, "digest": digest, "size": len(data)})
        manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": descriptors[0], "layers": descriptors[1:]}).encode()
        _http(self.host, "PUT", f"/v2/{repo}/manifests/{tag}", manifest, 201,
              {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        return manifest

    def push(self, source: str, repo: str, *, extra: tuple[str, ...] = ()) -> None:
        """skopeo copy SOURCE (e.g. oci-archive:PATH) to this registry as REPO (name:tag)."""
        argv: list[str | Path] = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", *extra]
        if self.basic_auth:
            argv += ["--dest-creds", f"{USER}:{PASSWORD}"]
        proc.run([*argv, source, f"docker://{self.host}/{repo}"], timeout=120)


def _http(host: str, method: str, path: str, body: bytes, status: int, headers: dict[str, str] | None = None) -> str:
    """One request to the registry; its Location header (path and query), for uploads."""
    conn = http.client.HTTPConnection(host, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/octet-stream", **(headers or {})})
        response = conn.getresponse()
        detail = response.read()
        if response.status != status:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}: {detail[:300]!r}")
        location = urllib.parse.urlsplit(response.headers.get("Location", ""))
        return location.path + (f"?{location.query}" if location.query else "")
    finally:
        conn.close()


def start_registry(workdir: Path, *, basic_auth: bool = False, tls: Tls | None = None) -> RunningRegistry:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    lines = ["version: 0.1", "log:", "  level: info", "storage:", "  filesystem:",
             f"    rootdirectory: {workdir / 'data'}", "  delete:", "    enabled: true", "http:",
             f"  addr: 127.0.0.1:{port}", "  secret: micropod-tests"]
    if tls:
        lines += ["  tls:", f"    certificate: {tls.cert}", f"    key: {tls.key}"]
    if basic_auth:
        htpasswd = htpasswd_file(workdir / "htpasswd")
        lines += ["auth:", "  htpasswd:", "    realm: micropod-test", f"    path: {htpasswd}"]
    config = workdir / "config.yml"
    config.write_text("\n".join(lines) + "\n")
    log = workdir / "registry.log"
    with log.open("wb") as out:
        child = proc.spawn([REGISTRY_BIN, "serve", config], stdout=out, stderr=out)
    registry = RunningRegistry(f"127.0.0.1:{port}", child, log, tls, basic_auth)
    wait_listening(port, registry.child, registry.log_tail)
    return registry


def wait_listening(port: int, child: subprocess.Popen[bytes] | None, tail: Callable[[], str],
                   timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and child.poll() is not None:
            raise RuntimeError(f"registry exited with {child.returncode}:\n{tail()}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"registry not listening on port {port} after {timeout}s:\n{tail()}")


# -- the front: Bearer tokens and faults in front of a real registry ----------------------------------

@dataclass
class Fault:
    """What the front does to requests whose path contains `match`: answer `status` (for `times`
    requests, then pass), or pass with the body corrupted/truncated, a Content-Type replaced, or a
    redirect to the front's blob store on another host name."""

    match: str
    status: int | None = None
    times: int = 1_000_000
    corrupt: bool = False
    truncate: bool = False
    content_type: str | None = None
    redirect: bool = False
    retry_after: str | None = None
    redirect_to: str | None = None  # the base URL of the blob store; the front's own on localhost if None
    body: bytes | None = None  # pass, but answer these bytes instead (a lying mirror: digest header to match)


@dataclass
class Front:
    upstream: str  # host:port of the real registry (plain HTTP)
    token_auth: bool = False
    require_basic_for_token: bool = False
    faults: list[Fault] = field(default_factory=list)
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # (method, path, headers)
    port: int = 0
    tokens_issued: list[str] = field(default_factory=list)
    tls: Tls | None = None  # serve HTTPS with this certificate
    realm: str | None = None  # the token realm's base URL; the front's own if None
    prefix: str = ""  # serve the registry under this path (a mirror's `https://host/prefix`); 404 elsewhere
    _server: http.server.ThreadingHTTPServer | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def base(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def start(self) -> Front:
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                front._handle(self)

            def do_HEAD(self) -> None:
                front._handle(self)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls.cert, self.tls.key)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True, name="front").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _send(self, h: http.server.BaseHTTPRequestHandler, status: int, body: bytes = b"",
              headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        path = h.path
        self.seen.append((h.command, path, dict(h.headers.items())))
        if self.prefix:
            if not path.startswith(self.prefix + "/"):
                return self._send(h, 404, b"no such path")
            path = path[len(self.prefix):]
        if path.startswith("/token"):
            auth = h.headers.get("Authorization", "")
            expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            if self.require_basic_for_token and auth != expected:
                return self._send(h, 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}')
            token = f"tok{len(self.tokens_issued)}"
            self.tokens_issued.append(path)
            return self._send(h, 200, f'{{"token":"{token}"}}'.encode(), {"Content-Type": "application/json"})
        if path.startswith("/_blobstore/"):
            path = path[len("/_blobstore"):]
        elif self.token_auth and not h.headers.get("Authorization", "").startswith("Bearer tok"):
            repo = path.split("/")[2] if path.count("/") > 3 else ""
            challenge = f'Bearer realm="{self.realm or self.base}/token",service="micropod-test"'
            if repo:
                challenge += f',scope="repository:{repo}:pull"'
            return self._send(h, 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"token needed"}]}',
                              {"WWW-Authenticate": challenge, "Content-Type": "application/json"})
        for fault in self.faults:
            if fault.match not in path or fault.times <= 0:
                continue
            if fault.status is not None:
                fault.times -= 1
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                return self._send(h, fault.status, b'{"errors":[{"code":"INJECTED","message":"injected fault"}]}',
                                  headers)
            if fault.redirect and not h.path.startswith("/_blobstore/"):
                store = fault.redirect_to or f"{'https' if self.tls else 'http'}://localhost:{self.port}"
                return self._send(h, 307, headers={"Location": f"{store}/_blobstore{path}"})
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            conn.request(h.command, path, headers={k: v for k, v in h.headers.items()
                                                   if k.lower() in ("accept", "range")})
            response = conn.getresponse()
            body = response.read()
            headers = {k: v for k, v in response.getheaders()
                       if k.lower() in ("content-type", "docker-content-digest", "location")}
        finally:
            conn.close()
        for fault in self.faults:
            if fault.match not in path:
                continue
            if fault.content_type:
                headers["Content-Type"] = fault.content_type
            if fault.body is not None:
                body = fault.body
                headers["Docker-Content-Digest"] = "sha256:" + hashlib.sha256(body).hexdigest()
            if fault.corrupt and body:
                body = bytes([body[0] ^ 0xFF]) + body[1:]
            if fault.truncate and body:
                h.send_response(response.status)
                for k, v in headers.items():
                    h.send_header(k, v)
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body[: len(body) // 2])
                h.wfile.flush()
                h.close_connection = True
                with contextlib.suppress(OSError):
                    h.connection.shutdown(socket.SHUT_RDWR)
                return None
        return self._send(h, response.status, body, headers)


@pytest.fixture(scope="session")
def plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    registry = start_registry(tmp_path_factory.mktemp("registry-plain"))
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    registry = start_registry(tmp_path_factory.mktemp("registry-basic"), basic_auth=True)
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    workdir = tmp_path_factory.mktemp("registry-tls")
    registry = start_registry(workdir, tls=make_tls(workdir / "tls"))
    yield registry
    registry.stop()


@pytest.fixture
def front(plain_registry: RunningRegistry) -> Iterator[Front]:
    server = Front(plain_registry.host).start()
    yield server
    server.stop()


def env_without_proxy() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
