"""A command run to its end in a running container, its output collected (the CRI's ExecSync, kubelet's probes)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from micropod.context import Context
from micropod.errors import ConflictError, MicropodError, TimeoutExpired
from micropod.monitor.api import Op
from micropod.monitor.client import MonitorClient
from micropod.state import VmRecord

OUTPUT_CAP = 16 << 20  # per stream; the rest is dropped and the command goes on (CVE-2022-31030)
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class ExecResult:
    code: int
    stdout: bytes
    stderr: bytes


def exec_sync(ctx: Context, record: VmRecord, args: list[str], timeout: float | None,
              cap: int = OUTPUT_CAP) -> ExecResult:
    """``args`` run in the container; TimeoutExpired after ``timeout`` seconds, with the process killed."""
    if record.status != "running":
        raise ConflictError(f"container {record.id} is not running")
    try:
        client = MonitorClient.of(ctx.root, record)
    except MicropodError:
        raise ConflictError(f"container {record.id} is not running") from None
    out, err = bytearray(), bytearray()

    def collect(stream: int, data: bytes) -> None:
        buffer = err if stream == 2 else out
        buffer += data[:max(0, cap - len(buffer))]

    spec = {"args": args, "env": [], "user": "", "cwd": "", "tty": False, "stdin": False}
    try:
        client.request(Op.EXEC, spec=spec, detach=False)
        message = client.follow(collect, until=(Op.EXEC_STARTED, Op.EXEC_EXIT, Op.ERROR), timeout=START_TIMEOUT)
        if message["op"] == Op.EXEC_STARTED:
            try:
                message = client.follow(collect, until=Op.EXEC_EXIT, timeout=timeout)
            except TimeoutExpired:
                with contextlib.suppress(MicropodError):
                    client.request(Op.SIGNAL, signal=9)
                raise TimeoutExpired(f"command {args[:1]} timed out after {timeout:g}s") from None
    finally:
        client.close()
    if message["op"] == Op.ERROR:
        raise ConflictError(str(message.get("message")))
    if message["op"] == Op.EXIT:  # the VM ended, or (a pod's monitor) the exec was refused
        raise ConflictError(str(message.get("error") or f"container {record.id} stopped while the command ran"))
    if message.get("error") and not out and not err:
        err += str(message["error"]).encode()[:cap]
    return ExecResult(int(message.get("code", 125)), bytes(out), bytes(err))
