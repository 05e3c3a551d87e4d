"""Bounded waits on a VMM child process, shared by the backends."""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from micropod.errors import BootError
from micropod.vmm.capped import CappedLog

T = TypeVar("T")
# A log to quote on failure: a file, or a pipe's capped log, whose thread may still be copying the last bytes.
LogSource = Path | CappedLog


TAIL_BYTES = 16384


def log_tail(path: Path, lines: int = 25) -> str:
    """The last non-blank lines of a log, reading only its end; "" if there is none."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
            data = f.read()
    except OSError:
        return ""
    text = data.decode(errors="replace").replace("\r", "")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def _tails(logs: tuple[LogSource, ...], exited: bool = False) -> str:
    paths = []
    for log in logs:
        if isinstance(log, CappedLog):
            if exited:
                log.settle()
            log = log.path
        paths.append(log)
    return "\n".join(f"--- {path.name} ---\n{log_tail(path) or '(no output)'}" for path in paths)


def died_error(what: str, proc: subprocess.Popen[bytes], *logs: LogSource) -> BootError:
    tails = _tails(logs, exited=True)
    return BootError(f"{what} exited with code {proc.returncode} before the guest came up:\n{tails}")


def wait_until(
    probe: Callable[[], T | None],
    *,
    proc: subprocess.Popen[bytes],
    timeout: float,
    what: str,
    logs: tuple[LogSource, ...],
    interval: float = 0.005,
) -> T:
    """Poll ``probe`` until it returns a value; fail early, with log tails, if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if proc.poll() is not None:
            raise died_error(what, proc, *logs)
        if time.monotonic() >= deadline:
            tails = _tails(logs)
            raise BootError(f"timed out after {timeout:.0f}s waiting for {what}:\n{tails}")
        time.sleep(interval)
        interval = min(interval * 2, 0.05)


def wait_exit(proc: subprocess.Popen[bytes], timeout: float | None) -> int | None:
    """Wait for the child using a pidfd so that the wait is bounded without polling."""
    if proc.poll() is not None:
        return proc.returncode
    if timeout is None:
        return proc.wait()
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    return proc.wait() if ready else None
