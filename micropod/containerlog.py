"""The container log: one docker json-file line per chunk, with time and stream.

Bytes that are not UTF-8 survive the round trip: they are decoded with surrogateescape, which JSON
writes as \\udcXX escapes, and encoded back the same way when read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO


@dataclass(frozen=True)
class LogEntry:
    time: str
    stream: str
    data: bytes


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ContainerLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None

    def write(self, stream: str, data: bytes) -> None:
        if self._file is None:
            self._file = self.path.open("ab")
        line = {"log": data.decode(errors="surrogateescape"), "stream": stream, "time": _now()}
        self._file.write(json.dumps(line).encode() + b"\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def parse_line(line: bytes) -> LogEntry | None:
    try:
        raw = json.loads(line)
        return LogEntry(raw["time"], raw["stream"], raw["log"].encode(errors="surrogateescape"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # a torn last line while the monitor is writing


def read_entries(path: Path, offset: int = 0) -> tuple[list[LogEntry], int]:
    """Whole entries from ``offset``; returns them and the offset just after the last whole line."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    entries = [e for e in (parse_line(line) for line in data[:end].splitlines()) if e]
    return entries, offset + end


def iter_entries(path: Path) -> Iterator[LogEntry]:
    entries, _ = read_entries(path)
    yield from entries
