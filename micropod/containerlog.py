"""The container log: one docker json-file line per chunk, with time and stream.

Bytes that are not UTF-8 survive the round trip: they are decoded with surrogateescape, which JSON
writes as \\udcXX escapes, and encoded back the same way when read.

A CRI container's output also goes to kubelet's file, one ``<RFC3339Nano> <stream> <F|P> <text>`` line per
entry (P: the line goes on in the next entry). kubelet rotates that file itself: it renames it and asks for a
reopen (ReopenContainerLog), after which the next entry starts a new file at the same path.

Rotation follows docker's json-file driver: with ``max_size`` set, a log that reaches it is renamed to
``container.log.1`` (older ones shift to ``.2`` ... and the oldest beyond ``max_files`` is dropped) and
a fresh one is started. Readers go through the rotated files, oldest first, then the live one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from micropod.errors import UsageError

log = logging.getLogger("micropod")

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
PARTIAL_LIMIT = 16 << 10


@dataclass(frozen=True)
class LogEntry:
    time: str
    stream: str
    data: bytes

    @property
    def timestamp(self) -> float:
        return parse_log_time(self.time)


def _now() -> str:
    return datetime.now(UTC).strftime(TIME_FORMAT)


def parse_log_time(text: str) -> float:
    try:
        return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return 0.0


def rotated(path: Path, index: int) -> Path:
    return path.with_name(f"{path.name}.{index}")


def cri_time(ns: int) -> str:
    seconds, fraction = divmod(ns, 1_000_000_000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{fraction:09d}Z"


def cri_line(stream: str, data: bytes, ns: int) -> bytes:
    full = data.endswith(b"\n")
    text = data[:-1] if full else data
    return b"%s %s %s %s\n" % (cri_time(ns).encode(), stream.encode(), b"F" if full else b"P", text)


class CriLog:
    """kubelet's copy of the output; a file that cannot be written is reported once, never fatal."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._failed = False

    def write(self, stream: str, data: bytes) -> None:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                                   0o640)
            except OSError as exc:
                if not self._failed:
                    log.warning("cannot write the CRI log %s: %s", self.path, exc.strerror)
                self._failed = True
                return
            self._failed = False
        try:
            os.write(self._fd, cri_line(stream, data, time.time_ns()))
        except OSError as exc:
            log.warning("writing the CRI log %s: %s", self.path, exc.strerror)

    def reopen(self) -> None:
        """After kubelet renamed the file: the next entry goes to a new one at the path."""
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ContainerLog:
    def __init__(self, path: Path, max_size: int = 0, max_files: int = 1, cri_path: str = "") -> None:
        self.path = path
        self.max_size = max_size
        self.max_files = max(1, max_files)
        self.cri = CriLog(Path(cri_path)) if cri_path else None
        self._file: BinaryIO | None = None
        self._size = 0
        self._partial: dict[str, bytes] = {}

    def write(self, stream: str, data: bytes) -> None:
        """One entry per line, as docker's json-file; a partial line waits for its end (or 16 KiB, or close)."""
        pending = self._partial.pop(stream, b"") + data
        lines = [part + b"\n" for part in pending.split(b"\n")]
        lines[-1] = lines[-1][:-1]  # what follows the last newline: a partial line, or nothing
        if not lines[-1]:
            lines.pop()
        elif len(lines[-1]) < PARTIAL_LIMIT:
            self._partial[stream] = lines.pop()
        for line in lines:
            self._write_entry(stream, line)

    def _write_entry(self, stream: str, data: bytes) -> None:
        if self.cri is not None:
            self.cri.write(stream, data)
        if self._file is None:
            self._file = self.path.open("ab")
            self._size = self._file.tell()
        line = {"log": data.decode(errors="surrogateescape"), "stream": stream, "time": _now()}
        encoded = json.dumps(line).encode() + b"\n"
        self._file.write(encoded)
        self._file.flush()
        self._size += len(encoded)
        if self.max_size and self._size >= self.max_size:
            self.rotate()

    def rotate(self) -> None:
        self._close_file()
        keep = self.max_files - 1
        rotated(self.path, keep + 1).unlink(missing_ok=True)
        if keep == 0:
            self.path.unlink(missing_ok=True)  # docker's max-file=1: the log starts over
        for index in range(keep, 0, -1):
            source = self.path if index == 1 else rotated(self.path, index - 1)
            if source.exists():
                os.replace(source, rotated(self.path, index))
        self._size = 0

    def close(self) -> None:
        for stream, rest in list(self._partial.items()):
            del self._partial[stream]
            self._write_entry(stream, rest)
        self._close_file()
        if self.cri is not None:
            self.cri.close()

    def _close_file(self) -> None:
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
    return _whole_lines(data, offset)


def _whole_lines(data: bytes, offset: int) -> tuple[list[LogEntry], int]:
    end = data.rfind(b"\n") + 1
    entries = [e for e in (parse_line(line) for line in data[:end].splitlines()) if e]
    return entries, offset + end


def iter_entries(path: Path) -> Iterator[LogEntry]:
    entries, _ = read_entries(path)
    yield from entries


_BLOCK = 64 << 10


def _whole_end(f: BinaryIO) -> int:
    """The offset just after the file's last newline (a torn last line is left for later)."""
    pos = os.fstat(f.fileno()).st_size
    while pos > 0:
        step = min(_BLOCK, pos)
        pos -= step
        f.seek(pos)
        newline = f.read(step).rfind(b"\n")
        if newline >= 0:
            return pos + newline + 1
    return 0


def _newest_first(f: BinaryIO, end: int) -> Iterator[LogEntry]:
    """The entries before ``end``, newest first, reading the file backwards a block at a time."""
    pos, carry = end, b""
    while pos > 0:
        step = min(_BLOCK, pos)
        pos -= step
        f.seek(pos)
        lines = (f.read(step) + carry).split(b"\n")
        carry = lines.pop(0) if pos > 0 else b""  # may be the end of a line that starts in the block before
        for line in reversed(lines):
            entry = parse_line(line) if line else None
            if entry:
                yield entry


class LogReader:
    """Every entry so far (rotated files first), then what is appended, across rotations."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None
        self._offset = 0

    def backlog(self) -> list[LogEntry]:
        entries: list[LogEntry] = []
        index = 1
        while rotated(self.path, index).exists():
            index += 1
        for older in range(index - 1, 0, -1):
            entries += read_entries(rotated(self.path, older))[0]
        with contextlib.suppress(FileNotFoundError):
            self._file = self.path.open("rb")
        entries += self.more()
        return entries

    def recent(self, tail: int | None, since: float | None,
               wanted: Callable[[LogEntry], bool] = lambda _: True) -> list[LogEntry]:
        """The last ``tail`` wanted entries, or those from ``since`` on, reading from the end of the newest
        file back only as far as needed (a log of any size costs what is shown); then ``more`` follows."""
        found: list[LogEntry] = []
        files: list[BinaryIO] = []
        with contextlib.suppress(FileNotFoundError):
            self._file = self.path.open("rb")
            self._offset = _whole_end(self._file)
        try:
            index = 1
            while rotated(self.path, index).exists():
                with contextlib.suppress(FileNotFoundError):
                    files.append(rotated(self.path, index).open("rb"))
                index += 1
            sources = [(self._file, self._offset)] if self._file else []
            sources += [(f, _whole_end(f)) for f in files]
            for f, end in sources:
                for entry in _newest_first(f, end):
                    if since is not None and entry.timestamp < since:
                        return found[::-1]
                    if wanted(entry):
                        if tail is not None and len(found) >= tail:
                            return found[::-1]
                        found.append(entry)
            return found[::-1]
        finally:
            for f in files:
                f.close()

    def more(self) -> list[LogEntry]:
        entries: list[LogEntry] = []
        if self._file is None:
            with contextlib.suppress(FileNotFoundError):
                self._file = self.path.open("rb")
                self._offset = 0
            if self._file is None:
                return entries
        new, self._offset = self._read_open()
        entries += new
        try:
            current = self.path.stat().st_ino
        except FileNotFoundError:
            current = -1
        if current != os.fstat(self._file.fileno()).st_ino:  # rotated: finish the old file, go on in the new
            new, self._offset = self._read_open()
            entries += new
            self._file.close()
            self._file = None
            entries += self.more() if current != -1 else []
        return entries

    def _read_open(self) -> tuple[list[LogEntry], int]:
        assert self._file is not None
        self._file.seek(self._offset)
        return _whole_lines(self._file.read(), self._offset)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


_RELATIVE = re.compile(r"^(?:(\d+(?:\.\d+)?)(h|m|s|ms))+$")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_since(text: str, now: float | None = None) -> float:
    """docker's --since/--until: RFC3339 (with or without a zone; UTC assumed), a Unix timestamp, or a
    duration before now like 10m, 1h30m, 45s."""
    now = time.time() if now is None else now
    value = text.strip()
    if _RELATIVE.match(value):
        units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
        return now - sum(float(n) * units[u] for n, u in _PART.findall(value))
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"invalid time {text!r}: use RFC3339 (2024-01-02T15:04:05Z), "
                         "a Unix timestamp, or a duration like 10m") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()
