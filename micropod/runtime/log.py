"""The runtime's messages: one line each on stderr, and in ``--log`` as runc writes it (text, or JSON objects
with level, msg and time, which is where containerd's shim reads a failure from). No logging package: the
runtime starts for every command, and its import costs more than this whole module."""

from __future__ import annotations

import json
import os
import sys
import time

_LEVELS = {"debug": 0, "info": 1, "warning": 2, "error": 3}


class _Config:
    path: str | None = None
    as_json = False
    debug = False


def configure(path: str | None, log_format: str, debug: bool) -> None:
    _Config.path, _Config.as_json, _Config.debug = path, log_format == "json", debug


def _write(level: str, message: str) -> None:
    if level == "debug" and not _Config.debug:
        return
    sys.stderr.write(f"{message}\n")
    if _Config.path is None:
        return
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    short = "warn" if level == "warning" else level
    line = (json.dumps({"level": short, "msg": message, "time": stamp}) if _Config.as_json
            else f'time="{stamp}" level={short} msg={json.dumps(message)}')
    try:
        fd = os.open(_Config.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def debug(message: str) -> None:
    _write("debug", message)


def warning(message: str) -> None:
    _write("warning", message)


def error(message: str) -> None:
    _write("error", message)
