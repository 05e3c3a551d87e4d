"""The CRI streaming server without a VM: its tokens, its refusals of requests it cannot serve, and whole SPDY
and WebSocket sessions for a container or sandbox that does not run, whose error channel says so (driven by
tests/spdy_client.py and websocket-client, never by the server's own code)."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import websocket

from micropod.cri.streaming import portforward
from micropod.cri.streaming.remotecommand import Request
from micropod.cri.streaming.server import StreamServer
from micropod.paths import StateRoot
from tests.spdy_client import PORTFORWARD, REMOTECOMMAND, Response, http_exchange, upgrade
from tests.test_e2e_run import wait_for

WAIT = 30.0
GHOST = Request("exec", "ghost", ("true",), stdin=False, stdout=True, stderr=True)


@pytest.fixture
def streams(tmp_path: Path) -> Iterator[StreamServer]:
    server = StreamServer(("127.0.0.1", 0), StateRoot(tmp_path / "root"))
    server.start()
    yield server
    server.shutdown()
    server.server_close()


def dial(server: StreamServer) -> socket.socket:
    host, port = server.server_address[:2]
    return socket.create_connection((str(host), port), timeout=WAIT)


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def plain(server: StreamServer, path: str, headers: list[tuple[str, str]] | None = None) -> Response:
    with dial(server) as sock:
        return http_exchange(sock, "POST", path, headers or [])[0]


def spdy_refusal(server: StreamServer, path: str, protocols: list[str]) -> Response:
    with dial(server) as sock:
        session, response = upgrade(sock, path, protocols)
        assert session is None, "the server upgraded"
        return response


def test_unknown_tokens_and_paths_are_not_found(streams: StreamServer) -> None:
    token = path_of(streams.url("exec", GHOST)).rsplit("/", 1)[1]
    for path in ("/exec/not-a-token", "/exec", f"/exec/{token}/more", f"/logs/{token}", "/"):
        response = plain(streams, path)
        assert response.status == 404, (path, response)
    with dial(streams) as sock:  # a malformed path spends no token
        session, response = upgrade(sock, f"/exec/{token}", [REMOTECOMMAND])
        assert session is not None, response
        session.close()


def test_a_token_is_single_use_whatever_became_of_its_first_use(streams: StreamServer) -> None:
    path = path_of(streams.url("exec", GHOST))
    first = plain(streams, path)  # no Upgrade header: refused, and the token is spent all the same
    assert (first.status, first.body) == (400, b"Upgrade request required\n")
    assert plain(streams, path).status == 404
    wrong_kind = path_of(streams.url("exec", GHOST)).replace("/exec/", "/portforward/")
    assert spdy_refusal(streams, wrong_kind, [PORTFORWARD]).status == 404
    assert spdy_refusal(streams, wrong_kind.replace("/portforward/", "/exec/"), [REMOTECOMMAND]).status == 404


def test_protocols_the_server_does_not_speak_are_refused(streams: StreamServer) -> None:
    refused = spdy_refusal(streams, path_of(streams.url("exec", GHOST)), ["v9.channel.k8s.io"])
    assert refused.status == 403 and b"unable to negotiate protocol" in refused.body, refused
    pf = spdy_refusal(streams, path_of(streams.url("portforward", portforward.Request("ghost", ()))), [REMOTECOMMAND])
    assert pf.status == 403, pf
    ws = [("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"),
          ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")]
    unknown = plain(streams, path_of(streams.url("exec", GHOST)), [*ws, ("Sec-WebSocket-Protocol", "chat")])
    assert unknown.status == 400 and b"unable to negotiate protocol" in unknown.body, unknown
    keyless = plain(streams, path_of(streams.url("exec", GHOST)),
                    [*ws[:3], ("Sec-WebSocket-Protocol", "v5.channel.k8s.io")])
    assert keyless.status == 400, keyless


def test_broken_spdy_ends_only_its_own_session(streams: StreamServer) -> None:
    with dial(streams) as sock:
        session, response = upgrade(sock, path_of(streams.url("exec", GHOST)), [REMOTECOMMAND])
        assert session is not None, response
        session.send(b"\x80\x02\x00\x01\x00\x00\x00\x00")  # a SYN_STREAM of SPDY/2
        assert session.closed.wait(WAIT)
    assert plain(streams, "/exec/gone").status == 404  # the server still serves


def test_exec_in_a_container_that_does_not_run_fails_on_the_error_channel(streams: StreamServer) -> None:
    with dial(streams) as sock:
        session, response = upgrade(sock, path_of(streams.url("exec", GHOST)), ["v9.channel.k8s.io", REMOTECOMMAND])
        assert session is not None and response.header("X-Stream-Protocol-Version") == REMOTECOMMAND, response
        session.ping()
        assert session.pong.wait(WAIT)
        opened = session.remotecommand("stdout", "stderr")
        status = json.loads(opened["error"].read_all(WAIT))
        assert opened["stdout"].read_all(WAIT) == b"" and opened["stderr"].read_all(WAIT) == b""
        assert session.goaway.wait(WAIT) and session.closed.wait(WAIT)
    assert status == {"metadata": {}, "status": "Failure", "message": "container ghost is not running",
                      "reason": "InternalError", "code": 500}
    with dial(streams) as sock:  # before v4 the error channel carries the message alone
        session, _ = upgrade(sock, path_of(streams.url("exec", GHOST)), ["v2.channel.k8s.io"])
        assert session is not None
        assert session.remotecommand("stdout", "stderr")["error"].read_all(WAIT) == b"container ghost is not running"


def test_the_same_over_websocket(streams: StreamServer) -> None:
    for protocol, message in (("v5.channel.k8s.io", b"\x03"), ("v4.base64.channel.k8s.io", b"3")):
        url = streams.url("exec", GHOST).replace("http://", "ws://")
        ws = websocket.create_connection(url, subprotocols=[protocol], timeout=WAIT)
        assert ws.getsubprotocol() == protocol
        opcode, data = ws.recv_data()
        assert opcode in (websocket.ABNF.OPCODE_BINARY, websocket.ABNF.OPCODE_TEXT) and data[:1] == message
        body = data[1:] if protocol.startswith("v5") else base64.b64decode(data[1:])
        assert json.loads(body)["message"] == "container ghost is not running"
        assert ws.recv_data(control_frame=True)[0] == websocket.ABNF.OPCODE_CLOSE
        ws.close()


def test_a_port_forward_to_a_sandbox_that_does_not_run_fails_on_its_error_stream(streams: StreamServer) -> None:
    with dial(streams) as sock:
        session, _ = upgrade(sock, path_of(streams.url("portforward", portforward.Request("ghost", (80,)))),
                             [PORTFORWARD])
        assert session is not None
        data, error = session.forward(80, 0)
        assert error.read_all(WAIT) == b"error forwarding port 80 to pod ghost: sandbox ghost is not running"
        assert data.read_all(WAIT) == b""
        data, error = session.forward(81, 1)  # the same session, another connection: a port not asked for
        assert error.read_all(WAIT) == (b"error forwarding port 81 to pod ghost: port 81 was not asked for in "
                                        b"PortForward")
        session.close()


def test_a_head_that_trickles_in_is_cut_off_at_one_deadline(tmp_path: Path) -> None:
    """The socket's timeout bounded each read alone: a byte every few seconds held a thread for hours."""
    import time

    server = StreamServer(("127.0.0.1", 0), StateRoot(tmp_path / "root"), head_timeout=1.0)
    server.start()
    try:
        with dial(server) as sock:
            sock.sendall(b"GET /exec/x HTTP/1.1\r\n")
            started = time.monotonic()
            closed = False
            while time.monotonic() - started < WAIT and not closed:
                try:
                    sock.sendall(b"X")  # one byte of a header every 0.2 s: each read is quick, the head never ends
                    sock.settimeout(0.2)
                    closed = sock.recv(1) == b""
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
            assert closed, "the server kept the connection"
            assert time.monotonic() - started < WAIT / 2
        long_line = b"GET /exec/x HTTP/1.1\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n"
        with dial(server) as sock:
            sock.sendall(long_line)
            assert sock.recv(1) == b""  # closed without an answer
    finally:
        server.shutdown()
        server.server_close()


def test_connections_beyond_the_cap_are_closed_at_once(tmp_path: Path) -> None:
    server = StreamServer(("127.0.0.1", 0), StateRoot(tmp_path / "root"), max_connections=2)
    server.start()
    try:
        held = [dial(server), dial(server)]  # accepted in order: these two take the slots before the third
        with dial(server) as third:
            assert third.recv(1) == b"", "a third connection got a thread"
        for sock in held:
            sock.close()

        def served() -> bool:  # once their threads see the ends, the slots are free again
            try:
                return plain(server, "/exec/nothing").status == 404
            except (OSError, EOFError):
                return False

        wait_for(served, WAIT, "a free slot")
    finally:
        server.shutdown()
        server.server_close()
