"""Just enough of a Kubernetes API server for kubectl's exec, attach and port-forward to reach micropod's
streaming server, as kubelet would send them there: the pod is looked up over the CRI (ListPodSandbox and
ListContainers), the stream URL comes from the CRI's Exec, Attach or PortForward, and the upgraded connection is
relayed byte for byte. kubectl (Go's spdystream and gorilla/websocket) is then a client that micropod did not write.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import socketserver
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any

from tests.cri_client import CriServer, pb

_POD_RESOURCES = [{"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod", "verbs": ["get"],
                   "shortNames": ["po"]}] + [
    {"name": f"pods/{sub}", "singularName": "", "namespaced": True, "kind": kind, "verbs": ["create", "get"]}
    for sub, kind in (("exec", "PodExecOptions"), ("attach", "PodAttachOptions"),
                      ("portforward", "PodPortForwardOptions"))]
DISCOVERY: dict[str, dict[str, Any]] = {
    "/api": {"kind": "APIVersions", "versions": ["v1"],
             "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": []},
    "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": _POD_RESOURCES},
    "/version": {"major": "1", "minor": "32", "gitVersion": "v1.32.0"},
}


def _relay(a: socket.socket, b: socket.socket) -> None:
    def copy(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    other = threading.Thread(target=copy, args=(b, a), daemon=True)
    other.start()
    copy(a, b)
    other.join(60)


Dial = Callable[[tuple[str, int]], socket.socket]


class KubeFront:
    def __init__(self, cri: CriServer, dial: Dial = socket.create_connection) -> None:
        self.cri = cri
        self.dial = dial  # how the streaming server is reached (it may listen in another network namespace)
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            rbufsize = 0

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                front.handle(self)

            def do_POST(self) -> None:
                front.handle(self)

        self.httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _sandbox(self, name: str) -> pb.PodSandbox | None:
        items = self.cri.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
        return next((s for s in items if s.metadata.name == name and s.state == pb.SANDBOX_READY), None)

    def _containers(self, sandbox: pb.PodSandbox) -> dict[str, str]:
        found = self.cri.runtime.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(
            pod_sandbox_id=sandbox.id, state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING)))).containers
        return {c.metadata.name: c.id for c in found}

    def _json(self, h: http.server.BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = urllib.parse.parse_qs(url.query)
        parts = url.path.strip("/").split("/")
        if url.path in DISCOVERY:
            self._json(h, 200, DISCOVERY[url.path])
            return
        # /api/v1/namespaces/NS/pods/NAME[/exec|attach|portforward]
        if len(parts) < 6 or parts[:3] != ["api", "v1", "namespaces"] or parts[4] != "pods":
            self._json(h, 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})
            return
        sandbox = self._sandbox(parts[5])
        if sandbox is None:
            self._json(h, 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                "code": 404, "message": f'pods "{parts[5]}" not found'})
            return
        containers = self._containers(sandbox)
        if len(parts) == 6:
            self._json(h, 200, {"kind": "Pod", "apiVersion": "v1",
                                "metadata": {"name": parts[5], "namespace": parts[3], "uid": sandbox.metadata.uid},
                                "spec": {"containers": [{"name": n} for n in containers]},
                                "status": {"phase": "Running"}})
            return
        flag = lambda name: query.get(name, ["false"])[0] in ("true", "1")  # noqa: E731
        rt = self.cri.runtime
        if parts[6] == "exec":
            url_ = rt.Exec(pb.ExecRequest(container_id=containers[query["container"][0]], cmd=query["command"],
                                          tty=flag("tty"), stdin=flag("stdin"), stdout=flag("stdout"),
                                          stderr=flag("stderr"))).url
        elif parts[6] == "attach":
            url_ = rt.Attach(pb.AttachRequest(container_id=containers[query["container"][0]], tty=flag("tty"),
                                              stdin=flag("stdin"), stdout=flag("stdout"), stderr=flag("stderr"))).url
        else:
            url_ = rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=sandbox.id,
                                                        port=[int(p) for p in query.get("ports", [])])).url
        self._proxy(h, url_)

    def _proxy(self, h: http.server.BaseHTTPRequestHandler, stream_url: str) -> None:
        target = urllib.parse.urlsplit(stream_url)
        upstream = self.dial((target.hostname or "127.0.0.1", target.port or 80))
        head = [f"{h.command} {target.path} HTTP/1.1"]
        head += [f"{k}: {v}" for k, v in h.headers.items() if k.lower() != "host"]
        head.append(f"Host: {target.netloc}")
        upstream.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        h.close_connection = True
        _relay(h.connection, upstream)
        upstream.close()
