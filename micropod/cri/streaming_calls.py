"""Exec, Attach and PortForward: each checks its request and answers with a single-use URL of the streaming
server (micropod/cri/streaming/), as kubelet expects of a runtime."""

from __future__ import annotations

import grpc

from micropod.context import Context
from micropod.cri.api import pb
from micropod.cri.containers import find as find_container
from micropod.cri.sandboxes import find as find_sandbox
from micropod.cri.status import CriError, invalid
from micropod.cri.streaming import portforward
from micropod.cri.streaming.remotecommand import Request
from micropod.cri.streaming.server import StreamServer


def _check_streams(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> None:
    if not (stdin or stdout or stderr):
        raise invalid("one of stdin, stdout, or stderr must be set")
    if tty and stderr:
        raise invalid("tty and stderr cannot both be true")


def _running(record_status: str, cid: str) -> None:
    if record_status != "running":
        raise CriError(grpc.StatusCode.FAILED_PRECONDITION, f'container "{cid}" is not running')


class Streaming:
    service = "RuntimeService"

    def __init__(self, server: StreamServer) -> None:
        self.server = server

    def _url(self, kind: str, request: Request | portforward.Request) -> str:
        try:
            return self.server.url(kind, request)
        except OverflowError as exc:
            raise CriError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None

    def Exec(self, ctx: Context, request: pb.ExecRequest) -> pb.ExecResponse:
        record, _ = find_container(ctx, request.container_id)
        if not request.cmd:
            raise invalid("cmd must not be empty")
        _check_streams(request.stdin, request.stdout, request.stderr, request.tty)
        _running(record.status, record.id)
        wanted = Request("exec", record.id, tuple(request.cmd), request.tty, request.stdin, request.stdout,
                         request.stderr)
        return pb.ExecResponse(url=self._url("exec", wanted))

    def Attach(self, ctx: Context, request: pb.AttachRequest) -> pb.AttachResponse:
        record, _ = find_container(ctx, request.container_id)
        _check_streams(request.stdin, request.stdout, request.stderr, request.tty)
        _running(record.status, record.id)
        wanted = Request("attach", record.id, (), request.tty, request.stdin, request.stdout, request.stderr)
        return pb.AttachResponse(url=self._url("attach", wanted))

    def PortForward(self, ctx: Context, request: pb.PortForwardRequest) -> pb.PortForwardResponse:
        pod, _ = find_sandbox(ctx, request.pod_sandbox_id)
        if pod.status != "running":
            raise CriError(grpc.StatusCode.FAILED_PRECONDITION, f'sandbox "{pod.id}" is not running')
        ports = tuple(request.port)
        if any(not 0 < p < 1 << 16 for p in ports):
            raise invalid(f"invalid port in {list(ports)}")
        return pb.PortForwardResponse(url=self._url("portforward", portforward.Request(pod.id, ports)))
