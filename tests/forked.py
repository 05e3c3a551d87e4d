"""Run a test's body in a forked child (it changes capabilities, seccomp, roots or fds for good) and get back
its wait status and what it wrote, within a bounded wait."""

from __future__ import annotations

import json
import os
import select
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest


def in_child(body: Callable[..., Any], timeout: float = 30.0, on_stdout: bool = False,
             given_fd: bool = False) -> tuple[int, bytes]:
    """``body`` in a child; it execs, or returns something JSON, written for it as {"result": ...} (or
    {"error": ...} if it raised) on the pipe, which is its stdout when ``on_stdout`` (for a body that execs).
    With ``given_fd`` the body is called with the pipe's fd (one that closes every other fd must keep it)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            if on_stdout:
                os.dup2(write_end, 1)
                write_end = 1
            try:
                reply: dict[str, Any] = {"result": body(write_end) if given_fd else body()}
            except BaseException as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(write_end, json.dumps(reply).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    data, deadline = b"", time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"the child did not finish within {timeout}s")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    return status, data
