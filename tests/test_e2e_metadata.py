"""End to end: real QEMU VMs ask their metadata service at 169.254.169.254 (micropod's server on the gateway,
reached through each VM's TAP) for tokens, identity, user data and credentials, in a test-made network
namespace (tests/nettopo.py)."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from tests import test_e2e_net
from tests.conftest import Cli
from tests.nettopo import Topology
from tests.test_e2e_exec import start_sleeper
from tests.test_e2e_net import guest, inspect
from tests.test_e2e_run import one_line_error

pytestmark = pytest.mark.e2e

ADDRESS = "169.254.169.254"
world = test_e2e_net.world  # the two-namespace fixture


def http(method: str, path: str, *headers: str) -> str:
    """A guest's shell line: one request with busybox nc; prints the answer's status line and body."""
    head = "".join(f"{h}\\r\\n" for h in headers)
    return f"printf '{method} {path} HTTP/1.1\\r\\nHost: {ADDRESS}\\r\\n{head}\\r\\n' | nc -w 5 {ADDRESS} 80"


def answer(cli: Cli, name: str, method: str, path: str, *headers: str) -> tuple[str, str]:
    """(status line, body) of one request from inside ``name``."""
    _, text = guest(cli, name, http(method, path, *headers))  # text mode: each CRLF came as LF
    status, _, rest = text.partition("\n")
    return status, rest.partition("\n\n")[2]


def session(cli: Cli, name: str, ttl: int = 300) -> str:
    status, token = answer(cli, name, "PUT", "/latest/api/token", f"X-metadata-token-ttl-seconds: {ttl}")
    assert status == "HTTP/1.1 200 OK", (status, token)
    return token


def test_each_vm_gets_its_own_identity_and_credentials(world: tuple[Topology, Cli], tmp_path: Path) -> None:
    topo, cli = world
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"db": {"host": "db.internal"}}))
    start_sleeper(cli, "alpha", "--metadata", "role=primary", "--metadata-file", str(data), "-l", "team=blue")
    # NET_ADMIN stands for a guest taken over: it will try to pass for alpha
    start_sleeper(cli, "beta", "--cap-add", "NET_ADMIN", "--metadata", "role=replica")
    alpha, beta = inspect(cli, "alpha"), inspect(cli, "beta")
    alpha_ip = alpha["NetworkSettings"]["IPAddress"]  # type: ignore[index]
    assert alpha["MetadataService"]["Enabled"] is True  # type: ignore[index]

    # no token, no data
    status, _ = answer(cli, "alpha", "GET", "/latest/meta-data/instance-id")
    assert status == "HTTP/1.1 401 Unauthorized", status
    token = f"X-metadata-token: {session(cli, 'alpha')}"
    assert answer(cli, "alpha", "GET", "/latest/meta-data/instance-id", token)[1] == alpha["Id"]
    assert answer(cli, "alpha", "GET", "/latest/meta-data/local-ipv4", token)[1] == alpha_ip
    assert answer(cli, "alpha", "GET", "/latest/user-data/role", token)[1] == "primary"
    assert answer(cli, "alpha", "GET", "/latest/user-data/db/host", token)[1] == "db.internal"
    document = json.loads(answer(cli, "alpha", "GET", "/latest/dynamic/instance-identity/document", token)[1])
    assert document["instanceId"] == alpha["Id"] and document["name"] == "alpha"
    assert document["labels"] == {"team": "blue"} and document["imageDigest"].startswith("sha256:")

    # the credential verifies on the host, for its audience; an altered one does not
    credential = answer(cli, "alpha", "GET", "/latest/credentials/jwt?audience=vault", token)[1]
    verified = cli("token", "verify", "--audience", "vault", credential)
    assert verified.returncode == 0, verified.stderr
    claims = json.loads(verified.stdout)
    assert claims["sub"] == alpha["Id"] and claims["name"] == "alpha" and claims["aud"] == "vault"
    wrong = cli("token", "verify", "--audience", "other", credential)
    assert wrong.returncode != 0 and "wrong audience" in one_line_error(wrong.stderr)
    header, payload, signature = credential.split(".")
    tampered = cli("token", "verify", "--any-audience", f"{header}.{payload[:-4]}AAAA.{signature}")
    assert tampered.returncode != 0 and one_line_error(tampered.stderr)

    # beta sees only its own data, and cannot pass for alpha: spoofed packets never leave its TAP
    beta_token = f"X-metadata-token: {session(cli, 'beta')}"
    assert answer(cli, "beta", "GET", "/latest/meta-data/instance-id", beta_token)[1] == beta["Id"]
    assert answer(cli, "beta", "GET", "/latest/meta-data/instance-id", token)[0].endswith("401 Unauthorized")
    code, text = guest(cli, "beta", f"ip addr add {alpha_ip}/32 dev eth0 && "
                                    f"ip route add {ADDRESS} via 10.88.0.1 src {alpha_ip} && "
                                    + http("GET", "/latest/user-data/role", token))
    assert "primary" not in text and "HTTP/1.1" not in text, (code, text)

    # the host's own users cannot reach alpha's server on the gateway: the firewall drops what they send
    with sqlite3.connect(cli.root / "state.db") as db:
        port = db.execute("SELECT metadata_port FROM attachments WHERE vm_id = ?", (alpha["Id"],)).fetchone()[0]
    assert port > 0
    local = topo.run(topo.host, sys.executable, "-c", "import socket, sys; "
                     f"c = socket.create_connection(('10.88.0.1', {port}), 3); "
                     "c.sendall(b'PUT /latest/api/token HTTP/1.1\\r\\nX-metadata-token-ttl-seconds: 9\\r\\n\\r\\n');"
                     " print(c.recv(100))")
    assert local.returncode != 0 and "timed out" in local.stderr, (local.stdout, local.stderr)

    # a token lives as long as it was asked to
    short = f"X-metadata-token: {session(cli, 'alpha', ttl=1)}"
    deadline = time.monotonic() + 30
    while answer(cli, "alpha", "GET", "/latest/meta-data/hostname", short)[0] != "HTTP/1.1 401 Unauthorized":
        assert time.monotonic() < deadline, "a one-second token still worked after 30 s"

    # keys rotate; what the previous key signed still verifies
    rotated = cli("token", "rotate-key")
    assert rotated.returncode == 0 and "previous key" in rotated.stdout, rotated.stderr
    assert cli("token", "verify", "--audience", "vault", credential).returncode == 0
    jwks = json.loads(cli("token", "jwks").stdout)
    assert len(jwks["keys"]) == 2 and {k["crv"] for k in jwks["keys"]} == {"Ed25519"}


def test_no_network_means_no_metadata_service(cli: Cli, tmp_path: Path) -> None:
    start_sleeper(cli, "offline")
    info = inspect(cli, "offline")["MetadataService"]
    assert info == {"Enabled": False, "Reason": "the VM has no network (--network none)"}
    refused = cli("run", "--rm", "--metadata", "a=b", "hello", "true")
    assert refused.returncode == 125 and "--metadata needs" in one_line_error(refused.stderr)
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    refused = cli("run", "--rm", "--metadata-file", str(bad), "hello", "true")
    assert refused.returncode == 125 and "is not valid JSON" in one_line_error(refused.stderr)
