"""The metadata service's parts without a VM: its HTTP rules (MMDS v2's), its tree, the credentials and keys,
the firewall rules that name the caller, and Firecracker's MMDS requests checked by the spec-checking fake."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from micropod.errors import UsageError
from micropod.metadata import credential, tree
from micropod.metadata.keyring import MAX_LIFETIME, CredentialError, KeyRing
from micropod.metadata.server import BadRequest, Handler, MetadataServer, Request, SessionTokens, parse
from micropod.metadata.vm import VmMetadata
from micropod.paths import StateRoot

IDENTITY = tree.Identity("a" * 64, "web", "hello:latest", "sha256:" + "b" * 64, "10.88.0.2", "web-host",
                         {"team": "blue"})


class Clock:
    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def root(tmp_path: Path) -> StateRoot:
    return StateRoot(tmp_path / "root").ensure()


def request(method: str, target: str, **headers: str) -> Request:
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return parse(head.rstrip("\r\n").encode())


def handler(root: StateRoot, clock: Clock, user_data: tree.Tree | None = None) -> tuple[Handler, Clock]:
    monotonic = Clock(100.0)
    metadata = VmMetadata(root, IDENTITY, user_data or {"role": "db"}, clock)
    return Handler(metadata.tree, metadata.credential, SessionTokens(monotonic)), monotonic


def session(h: Handler, ttl: str = "60") -> str:
    answer = h.respond(request("PUT", "/latest/api/token", **{"X-metadata-token-ttl-seconds": ttl}))
    assert answer.status == 200, answer.body
    return answer.body.decode()


def test_session_tokens_follow_mmds_v2(root: StateRoot) -> None:
    h, monotonic = handler(root, Clock())
    assert h.respond(request("GET", "/latest/meta-data/instance-id")).status == 401
    assert h.respond(request("PUT", "/latest/api/token")).status == 400  # no TTL
    for ttl in ("0", "21601", "-5", "ten"):
        assert h.respond(request("PUT", "/latest/api/token", **{"X-metadata-token-ttl-seconds": ttl})).status == 400
    forwarded = request("PUT", "/latest/api/token", **{"X-metadata-token-ttl-seconds": "60",
                                                      "X-Forwarded-For": "10.0.0.9"})
    assert h.respond(forwarded).status == 400
    token = session(h, "2")
    answer = h.respond(request("GET", "/latest/meta-data/instance-id", **{"X-metadata-token": token}))
    assert (answer.status, answer.body) == (200, IDENTITY.instance_id.encode())
    # EC2's header names work too
    ec2 = h.respond(request("PUT", "/latest/api/token", **{"X-aws-ec2-metadata-token-ttl-seconds": "60"})).body
    assert h.respond(request("GET", "/latest/meta-data/", **{"X-aws-ec2-metadata-token": ec2.decode()})).status == 200
    # a forged or altered token, and an expired one, are refused
    expiry, _, mac = token.partition(".")
    for forged in (f"{int(expiry) + 10_000}.{mac}", f"{expiry}.{mac[:-2]}AA", "x", ""):
        assert h.respond(request("GET", "/latest/meta-data/", **{"X-metadata-token": forged})).status == 401
    monotonic.now += 2.5
    assert h.respond(request("GET", "/latest/meta-data/", **{"X-metadata-token": token})).status == 401
    # another server's (another VM's) token is not this one's
    other, _ = handler(root, Clock())
    assert h.respond(request("GET", "/latest/meta-data/", **{"X-metadata-token": session(other)})).status == 401
    assert h.respond(request("POST", "/latest/api/token")).status == 405


def test_tree_paths_listings_and_json(root: StateRoot) -> None:
    h, _ = handler(root, Clock(), {"role": "db", "nested": {"a": "1"}})
    token = {"X-metadata-token": session(h)}

    def get(path: str, **extra: str) -> tuple[int, str]:
        answer = h.respond(request("GET", path, **token, **extra))
        return answer.status, answer.body.decode()

    assert get("/latest/meta-data/local-ipv4") == (200, "10.88.0.2")
    assert get("/latest/meta-data/hostname") == (200, "web-host")
    assert get("/latest/") == (200, "meta-data/\ndynamic/\nuser-data/\ncredentials/")
    assert get("/latest/user-data/role") == (200, "db")
    assert json.loads(get("/latest/user-data", Accept="application/json")[1]) == {"role": "db", "nested": {"a": "1"}}
    document = json.loads(get("/latest/dynamic/instance-identity/document")[1])
    assert document == {"instanceId": IDENTITY.instance_id, "name": "web", "image": "hello:latest",
                        "imageDigest": IDENTITY.image_digest, "privateIp": "10.88.0.2", "hostname": "web-host",
                        "labels": {"team": "blue"}}
    assert get("/latest/meta-data/nothing")[0] == 404
    assert get("/latest/credentials/jwt?audience=a&audience=b")[0] == 400
    assert get("/latest/credentials/jwt?audience=%20bad")[0] == 400
    assert h.respond(request("GET", "/x", **token)).status == 404
    with pytest.raises(BadRequest):
        parse(b"GET /?" + b"&".join(b"a%d=1" % i for i in range(20)) + b" HTTP/1.1")


def test_credentials_verify_and_tampering_fails(root: StateRoot) -> None:
    clock = Clock()
    h, _ = handler(root, clock)
    token = {"X-metadata-token": session(h)}
    default = h.respond(request("GET", "/latest/credentials/jwt", **token)).body.decode()
    claims = credential.verify(default, None, root)
    assert claims["sub"] == IDENTITY.instance_id and claims["aud"] == "micropod" and claims["name"] == "web"
    assert claims["image_digest"] == IDENTITY.image_digest and claims["iss"] == credential.issuer(root)
    assert claims["exp"] - claims["iat"] == credential.DEFAULT_LIFETIME and claims["jti"]
    for_vault = h.respond(request("GET", "/latest/credentials/jwt?audience=vault", **token)).body.decode()
    assert credential.verify(for_vault, "vault", root)["aud"] == "vault"
    with pytest.raises(CredentialError, match="wrong audience"):
        credential.verify(for_vault, "micropod", root)
    with pytest.raises(CredentialError, match="wrong audience"):  # no audience given: the default one is checked
        credential.verify(for_vault, None, root)
    assert credential.verify(for_vault, None, root, any_audience=True)["aud"] == "vault"
    # the tree's credential is the same one, reused until a third of its life is left
    assert tree.lookup(h.content(), "/latest/credentials/jwt") == default
    header, payload, signature = default.split(".")
    forged_claims = json.loads(jwt.utils.base64url_decode(payload))
    forged_claims["sub"] = "b" * 64
    forged = ".".join((header, jwt.utils.base64url_encode(json.dumps(forged_claims).encode()).decode(), signature))
    with pytest.raises(CredentialError, match="bad signature"):
        credential.verify(forged, None, root)
    with pytest.raises(CredentialError, match="not a credential"):
        credential.verify("not.a.jwt", None, root)
    # another state root's keys know nothing of it
    other = StateRoot(root.path.parent / "other").ensure()
    with pytest.raises(CredentialError, match="unknown key"):
        credential.verify(default, None, other)


def test_expired_credentials_are_refused_and_renewed(root: StateRoot) -> None:
    clock = Clock(time.time() - credential.DEFAULT_LIFETIME - 2 * credential.LEEWAY)  # minted a lifetime ago
    metadata = VmMetadata(root, IDENTITY, {}, clock)
    first = metadata.credential()
    with pytest.raises(CredentialError, match="expired"):
        credential.verify(first, None, root)
    clock.now += credential.DEFAULT_LIFETIME / 2
    assert metadata.credential() == first  # more than a third of its life left: reused
    clock.now += credential.DEFAULT_LIFETIME / 4
    renewed = metadata.credential()
    assert renewed != first
    assert jwt.decode(renewed, options={"verify_signature": False})["exp"] > jwt.decode(
        first, options={"verify_signature": False})["exp"]


def test_key_rotation_keeps_the_previous_key_until_its_tokens_expire(root: StateRoot,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr("time.time", clock)  # the key ring's clock; PyJWT's own stays the real one
    ring = KeyRing(root)
    old = credential.Issuer(root, clock).mint(credential.Subject("v" * 64, "n", "i", "d"), "micropod", 600)[0]
    old_kid = ring.signing_key().kid
    assert stat.S_IMODE(os.stat(ring.path).st_mode) == 0o600
    fresh, previous = ring.rotate()
    assert previous is not None and previous.kid == old_kid and fresh.kid != old_kid
    new = credential.Issuer(root, clock).mint(credential.Subject("v" * 64, "n", "i", "d"), "micropod", 600)[0]
    assert jwt.get_unverified_header(new)["kid"] == fresh.kid
    assert {key["kid"] for key in ring.jwks()["keys"]} == {fresh.kid, old_kid}
    credential.verify(old, None, root)  # signed before the rotation, not yet expired
    clock.now += MAX_LIFETIME + 1
    assert [key["kid"] for key in ring.jwks()["keys"]] == [fresh.kid]
    with pytest.raises(CredentialError, match="unknown key"):
        credential.verify(old, None, root)
    # what jwks prints verifies the new credentials with any JWT library
    public = jwt.PyJWK(ring.jwks()["keys"][0])
    clock.now -= MAX_LIFETIME + 1
    assert jwt.decode(new, public.key, algorithms=["EdDSA"], audience="micropod")["sub"] == "v" * 64


def test_user_data_is_checked(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text('{"a": {"b": "c"}, "x": "file"}')
    assert tree.user_data(("x=flag", "y=a=b"), str(good)) == {"a": {"b": "c"}, "x": "flag", "y": "a=b"}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="is not valid JSON"):
        tree.user_data((), str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(UsageError, match="not a JSON object"):
        tree.user_data((), str(bad))
    bad.write_text(json.dumps({"a/b": "c"}))
    with pytest.raises(UsageError, match="without '/'"):
        tree.user_data((), str(bad))
    with pytest.raises(UsageError, match="KEY=VALUE"):
        tree.user_data(("novalue",), None)
    with pytest.raises(UsageError, match="over 32 KiB"):
        tree.user_data(("big=" + "x" * (33 << 10),), None)


@contextlib.contextmanager
def serving(metadata: VmMetadata, peer: str) -> Iterator[int]:
    """The VM's server on a loopback port that answers ``peer`` alone; the port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = MetadataServer(listener, Handler(metadata.tree, metadata.credential, SessionTokens()), peer)
    server.start()
    try:
        yield server.port
    finally:
        server.close()


def exchange(port: int, data: bytes) -> bytes:
    """What the server answers ``data`` with before it closes (nothing if it resets the connection)."""
    with socket.create_connection(("127.0.0.1", port), 5) as conn:
        conn.sendall(data)
        try:
            return conn.makefile("rb").read()
        except ConnectionResetError:
            return b""


def test_the_server_answers_only_its_vm(root: StateRoot) -> None:
    """Over loopback: the VM's address is the only peer answered, and each connection gets one answer."""
    metadata = VmMetadata(root, IDENTITY, {})
    token_request = b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n"
    with serving(metadata, "127.0.0.1") as port:
        answer = exchange(port, token_request)
        assert answer.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in answer
        assert exchange(port, b"\x00\xff garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
        assert exchange(port, b"G" * 9000).startswith(b"HTTP/1.1 400")
    with serving(metadata, "10.88.0.2") as port:
        assert exchange(port, token_request) == b""  # closed unanswered
    assert not any(t.name == "metadata" and t.is_alive() for t in threading.enumerate())


def test_token_verify_reads_the_credential_from_stdin(root: StateRoot) -> None:
    """An argument is visible to every user in ps; stdin is not."""
    import subprocess
    import sys

    token = credential.Issuer(root).mint(credential.Subject("v" * 64, "n", "i", "d"), "micropod", 600)[0]
    env = dict(os.environ, MICROPOD_ROOT=str(root.path))
    out = subprocess.run([sys.executable, "-m", "micropod", "token", "verify"], input=token, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout)["sub"] == "v" * 64, out.stderr
    out = subprocess.run([sys.executable, "-m", "micropod", "token", "verify", "--audience", "other", "-"],
                         input=token, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 125 and out.stderr.strip().endswith("wrong audience: the credential is not for 'other'")
