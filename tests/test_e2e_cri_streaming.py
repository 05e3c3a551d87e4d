"""Exec, Attach and PortForward over the CRI's streaming server, end to end: one sandbox (a real microVM under
QEMU) with three containers, reached with tests/spdy_client.py, websocket-client and, where it is installed, the
real kubectl through tests/kube_front.py.

PortForward needs the pod to have a network, so the CRI server runs in a namespace of the test's own
(tests/nettopo.py), with micropod's bridge in it; the test itself stays in the machine's namespace and makes
its connections to the streaming server from inside that one (nettopo.connect_in).
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import socket
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import websocket

from tests.conftest import Cli, require_guest
from tests.cri_client import CriServer, pb
from tests.kube_front import KubeFront
from tests.nettopo import Topology, connect_in, topology
from tests.spdy_client import PORTFORWARD, REMOTECOMMAND, Session, resize_message, upgrade
from tests.test_e2e_cri import BOOT, container, sandbox
from tests.test_e2e_run import wait_for

pytestmark = pytest.mark.e2e

WAIT = 60.0
KUBECTL = "/usr/bin/kubectl"
ECHO_PORT = 8080


@dataclass
class Pod:
    topo: Topology
    cri: CriServer
    sid: str
    ids: dict[str, str]  # container name -> id

    def dial(self, address: tuple[str, int]) -> socket.socket:
        return connect_in(self.topo.host, address)

    def spdy(self, url: str, protocol: str = REMOTECOMMAND) -> Session:
        parts = urllib.parse.urlsplit(url)
        session, response = upgrade(self.dial((parts.hostname or "", parts.port or 80)), parts.path, [protocol])
        assert session is not None, f"{response}\n{self.cri.log_tail()}"
        return session

    def websocket(self, url: str, protocol: str) -> websocket.WebSocket:
        parts = urllib.parse.urlsplit(url)
        ws = websocket.create_connection(url.replace("http://", "ws://"), subprotocols=[protocol], timeout=WAIT,
                                         socket=self.dial((parts.hostname or "", parts.port or 80)))
        assert ws.getsubprotocol() == protocol
        return ws

    def exec_url(self, name: str, cmd: list[str], **streams: bool) -> str:
        return str(self.cri.runtime.Exec(pb.ExecRequest(container_id=self.ids[name], cmd=cmd, **streams)).url)


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory, hello_archive: Path) -> Iterator[Pod]:
    require_guest()
    tmp = tmp_path_factory.mktemp("cri-streaming")
    with topology() as topo:
        cli = Cli(tmp / "root", netns=topo.host)
        loaded = cli("load", "-i", str(hello_archive))
        assert loaded.returncode == 0, loaded.stderr
        cri = CriServer(tmp / "root", tmp / "run" / "cri.sock", tmp / "cri.log",
                        wrapper=("ip", "netns", "exec", topo.host)).start()
        try:
            yield _start_pod(topo, cri, tmp / "logs")
        finally:
            cri.stop()
            left = cli("pod", "ps", "-q", "--no-trunc").stdout.split()
            if left:
                cli("pod", "rm", "-f", *left, timeout=120)


def _start_pod(topo: Topology, cri: CriServer, logs: Path) -> Pod:
    scripts = {
        "shell": ("exec sleep 3600", {}),
        "reader": ('while read line; do echo "got:$line"; done', {"stdin": True}),  # attach's partner
        "echo": (f"exec nc -ll -p {ECHO_PORT} -e cat", {}),  # an echo server for each forwarded connection
    }
    for name in scripts:
        (logs / name).mkdir(parents=True)
    config = sandbox(logs)
    rt = cri.runtime
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=BOOT).pod_sandbox_id
    ids = {}
    for name, (script, fields) in scripts.items():
        ids[name] = rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=config, config=container(name, script, **fields))).container_id
        rt.StartContainer(pb.StartContainerRequest(container_id=ids[name]), timeout=BOOT)

    def echo_listens() -> bool:  # a forwarded connection before nc listens is refused (the pod shares one network)
        probe = f"cat /proc/net/tcp /proc/net/tcp6 | grep -qE ':{ECHO_PORT:04X} [0-9A-F]+:0000 0A'"
        return rt.ExecSync(pb.ExecSyncRequest(container_id=ids["shell"], cmd=["sh", "-c", probe], timeout=10),
                           timeout=40).exit_code == 0

    wait_for(echo_listens, 60, "the pod's echo server", cri.log_tail)
    return Pod(topo, cri, sid, ids)


def exit_status(raw: bytes) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(raw)
    return status


def exit_code_cause(status: dict[str, Any]) -> str:
    assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode", status
    causes = status["details"]["causes"]
    assert [c["reason"] for c in causes] == ["ExitCode"], status
    return str(causes[0]["message"])


def test_exec_over_spdy_keeps_stdout_and_stderr_apart_pipes_stdin_and_reports_the_exit_code(pod: Pod) -> None:
    url = pod.exec_url("shell", ["sh", "-c", "cat; echo to-stderr >&2; exit 3"], stdin=True, stdout=True,
                       stderr=True)
    session = pod.spdy(url)
    try:
        streams = session.remotecommand("stdin", "stdout", "stderr")
        streams["stdin"].write(b"piped in\n")
        streams["stdin"].close()  # cat's EOF: the command goes on to its exit
        assert streams["stdout"].read_all(WAIT) == b"piped in\n", pod.cri.log_tail()
        assert streams["stderr"].read_all(WAIT) == b"to-stderr\n"
        assert exit_code_cause(exit_status(streams["error"].read_all(WAIT))) == "3"
    finally:
        session.close()
    success = pod.spdy(pod.exec_url("shell", ["true"], stdout=True))
    try:
        assert exit_status(success.remotecommand("stdout")["error"].read_all(WAIT)) == {"metadata": {},
                                                                                       "status": "Success"}
    finally:
        success.close()


def test_exec_with_a_tty_sees_the_size_sent_on_the_resize_stream(pod: Pod) -> None:
    # The size is sent as kubectl does, at once, so the shell waits (bounded) for it to be applied.
    script = ('[ -t 0 ] && echo is-a-tty; i=0; while [ "$(busybox stty size)" != "37 111" ] && [ $i -lt 300 ]; '
              'do sleep 0.1; i=$((i+1)); done; echo "size:$(busybox stty size)"')
    session = pod.spdy(pod.exec_url("shell", ["sh", "-c", script], tty=True, stdin=True, stdout=True))
    try:
        streams = session.remotecommand("stdin", "stdout", "resize")
        streams["resize"].write(resize_message(111, 37))
        out = streams["stdout"].read_all(WAIT)
        assert b"is-a-tty\r\n" in out and b"size:37 111\r\n" in out, (out, pod.cri.log_tail())
        assert exit_status(streams["error"].read_all(WAIT))["status"] == "Success"
    finally:
        session.close()


def ws_session(ws: websocket.WebSocket, decode: Callable[[bytes], tuple[int, bytes]]) -> dict[int, bytes]:
    """Every channel's bytes until the server closes."""
    got: dict[int, bytes] = {}
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return got
        if opcode in (websocket.ABNF.OPCODE_BINARY, websocket.ABNF.OPCODE_TEXT) and data:
            channel, payload = decode(data)
            got[channel] = got.get(channel, b"") + payload


def test_exec_over_websocket_v5_and_base64(pod: Pod) -> None:
    url = pod.exec_url("shell", ["sh", "-c", "cat; echo err >&2; exit 7"], stdin=True, stdout=True, stderr=True)
    ws = pod.websocket(url, "v5.channel.k8s.io")
    try:
        ws.send_binary(b"\x00over websocket\n")
        ws.send_binary(b"\xff\x00")  # v5's close of stdin
        got = ws_session(ws, lambda data: (data[0], data[1:]))
    finally:
        ws.close()
    assert got.get(1) == b"over websocket\n" and got.get(2) == b"err\n", (got, pod.cri.log_tail())
    assert exit_code_cause(exit_status(got[3])) == "7"

    ws = pod.websocket(pod.exec_url("shell", ["echo", "in base64"], stdout=True), "v4.base64.channel.k8s.io")
    try:
        got = ws_session(ws, lambda data: (data[0] - ord("0"), base64.b64decode(data[1:])))
    finally:
        ws.close()
    assert got.get(1) == b"in base64\n" and exit_status(got[3])["status"] == "Success", got


def test_attach_relays_stdin_and_output_of_the_main_process_and_leaves_it_running(pod: Pod) -> None:
    rt = pod.cri.runtime
    url = rt.Attach(pb.AttachRequest(container_id=pod.ids["reader"], stdin=True, stdout=True, stderr=True)).url
    session = pod.spdy(url)
    try:
        streams = session.remotecommand("stdin", "stdout", "stderr")
        streams["stdin"].write(b"ping\n")
        out = streams["stdout"].read_until(b"got:ping\n", WAIT)
        assert b"got:ping\n" in out, (out, pod.cri.log_tail())
    finally:
        session.close()  # the client goes away; its stdin is not closed, so the container reads on
    state = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=pod.ids["reader"])).status.state
    assert state == pb.CONTAINER_RUNNING
    again = pod.spdy(rt.Attach(pb.AttachRequest(container_id=pod.ids["reader"], stdin=True, stdout=True)).url)
    try:
        streams = again.remotecommand("stdin", "stdout")
        streams["stdin"].write(b"again\n")
        assert b"got:again\n" in streams["stdout"].read_until(b"got:again\n", WAIT), pod.cri.log_tail()
    finally:
        again.close()


def test_port_forward_over_spdy_and_websocket_reaches_a_server_in_the_pod(pod: Pod) -> None:
    url = pod.cri.runtime.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod.sid, port=[ECHO_PORT])).url
    session = pod.spdy(url, PORTFORWARD)
    try:
        for request_id in (0, 1):  # two connections over one session, one after the other
            data, error = session.forward(ECHO_PORT, request_id)
            data.write(f"hello {request_id}\n".encode())
            data.close()  # the pod's server sees EOF, echoes what it had, and closes
            assert data.read_all(WAIT) == f"hello {request_id}\n".encode(), pod.cri.log_tail()
            assert error.read_all(WAIT) == b""
        data, error = session.forward(9, 2)
        assert b"port 9 was not asked for" in error.read_all(WAIT)
    finally:
        session.close()

    url = pod.cri.runtime.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod.sid, port=[ECHO_PORT])).url
    ws = pod.websocket(url, "v4.channel.k8s.io")
    try:
        port_le = ECHO_PORT.to_bytes(2, "little")
        assert [ws.recv_data()[1] for _ in range(2)] == [b"\x00" + port_le, b"\x01" + port_le]
        ws.send_binary(b"\x00over websocket\n")
        assert ws.recv_data()[1] == b"\x00over websocket\n", pod.cri.log_tail()
    finally:
        ws.close()


@pytest.fixture
def kubectl(pod: Pod, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    if not os.path.exists(KUBECTL):
        pytest.skip("kubectl is not installed (and not apt-installable)")
    front = KubeFront(pod.cri, dial=pod.dial)

    def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        environ = {**os.environ, "KUBECONFIG": str(tmp_path / "none"), "HOME": str(tmp_path), **(env or {})}
        return subprocess.Popen([shutil.which("kubectl") or KUBECTL, "-s", front.url, *args], env=environ,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    try:
        yield spawn
    finally:
        front.close()


@pytest.mark.parametrize("websockets", ["false", "true"])
def test_kubectl_exec(pod: Pod, kubectl: Callable[..., subprocess.Popen[str]], websockets: str) -> None:
    child = kubectl("exec", "-i", "web", "-c", "shell", "--", "sh", "-c", "cat; echo to-stderr >&2; exit 5",
                    env={"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": websockets})
    out, err = child.communicate("from kubectl\n", timeout=WAIT)
    assert (child.returncode, out) == (5, "from kubectl\n"), (err, pod.cri.log_tail())
    assert "to-stderr" in err and "command terminated with exit code 5" in err, err


# With websockets on, kubectl first asks for SPDY tunnelled in a WebSocket (SPDY/3.1+portforward.k8s.io), which
# the API server speaks and kubelet's streaming server does not: refused with 400, kubectl falls back to SPDY.
@pytest.mark.parametrize("websockets", ["false", "true"])
def test_kubectl_port_forward(pod: Pod, kubectl: Callable[..., subprocess.Popen[str]], websockets: str) -> None:
    child = kubectl("port-forward", "pod/web", f":{ECHO_PORT}", env={"KUBECTL_PORT_FORWARD_WEBSOCKETS": websockets})
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], WAIT)
        line = child.stdout.readline() if ready else ""
        found = re.search(r"Forwarding from 127\.0\.0\.1:(\d+) ->", line)
        assert found, (line, child.poll(), pod.cri.log_tail())
        with socket.create_connection(("127.0.0.1", int(found.group(1))), timeout=WAIT) as conn:
            conn.sendall(b"via kubectl\n")
            got = b""
            while b"\n" not in got and (chunk := conn.recv(1 << 12)):
                got += chunk
        assert got == b"via kubectl\n", pod.cri.log_tail()
    finally:
        child.terminate()
        stderr = child.communicate(timeout=WAIT)[1]
    assert "error" not in stderr.lower(), stderr
