"""What the guest agent may send the host, checked field by field before the monitor acts on it.

Everything on the agent channel is hostile once a container runs (the container can take over the agent), so
each agent -> host op has one parser here that checks every field's type and range. A message that fails is
refused: the monitor logs one rate-limited line and carries on as if it had never come.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from micropod import wire
from micropod.errors import ProtocolError, printable
from micropod.wire import GuestOp

log = logging.getLogger("micropod.monitor")

# The ops an agent sends (host -> agent ops are the monitor's to name).
HELLO, EXIT, LOG, SYSLOG, OK, ERROR = (GuestOp.HELLO, GuestOp.EXIT, GuestOp.LOG, GuestOp.SYSLOG, GuestOp.OK,
                                      GuestOp.ERROR)

MAX_CONTROL = 256 << 10  # a control message from the guest; output goes in DATA frames
MAX_TEXT = 64 << 10  # a log line, a syslog datagram (the agent reads 64 KiB), an error message
MAX_ID = 64
MAX_SID = (1 << 30) - 1  # stream ids are sid * 4 + fd in 32 bits
MAX_CODE = 255  # exit codes: 0-255, a signal's death being 128 + its number (at most 128 + 64)
MAX_COUNTER = (1 << 63) - 1
STATS_FIELDS = ("cpu_total", "cpu_idle", "cpus", "mem_used", "mem_total", "block_read", "block_write", "pids")
STATS_OPTIONAL = ("net_rx", "net_tx")


class BadGuestMessage(ProtocolError):
    """A message from the guest that is malformed or out of range; it is refused."""


@dataclass(frozen=True)
class Hello:
    version: int
    uptime: float | None


@dataclass(frozen=True)
class Exit:
    cid: str
    sid: int
    code: int
    message: str | None


@dataclass(frozen=True)
class Log:
    message: str


@dataclass(frozen=True)
class Syslog:
    cid: str
    message: str


@dataclass(frozen=True)
class Reply:
    """An agent's ``ok`` or ``error`` to request ``req``; ``fields`` are an ok's results, unchecked until used."""

    req: int
    ok: bool
    message: str = ""
    code: int = 125
    fields: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failure(cls, message: str, code: int = 125) -> Reply:
        """The answer for a request that never reached the agent."""
        return cls(0, False, message, code)


GuestMessage = Hello | Exit | Log | Syslog | Reply


def parse(payload: bytes) -> GuestMessage:
    """Decode and check one control frame from the guest; BadGuestMessage says why it is refused."""
    if len(payload) > MAX_CONTROL:
        raise BadGuestMessage(f"control message of {len(payload)} bytes (at most {MAX_CONTROL})")
    try:
        message = wire.decode_control(payload)
    except (wire.FrameError, RecursionError) as exc:
        raise BadGuestMessage(str(exc)) from None
    op = message["op"]
    parser = _PARSERS.get(op)
    if parser is None:
        raise BadGuestMessage(f"unknown op {_show(op)}")
    return parser(message)


def stats(reply: Reply) -> dict[str, int]:
    """A stats reply's counters: every one an integer in range, the optional ones 0 when absent."""
    fields = {**reply.fields, "op": GuestOp.STATS}
    counters = {name: _int(fields, name, 0, MAX_COUNTER) for name in STATS_FIELDS}
    for name in STATS_OPTIONAL:
        counters[name] = _int(fields, name, 0, MAX_COUNTER, default=0)
    if counters["cpus"] < 1:
        raise BadGuestMessage("stats: cpus is 0")
    return counters


class Refusals:
    """One monitor.log line per refused message, rate-limited: the first ``first``, then every ``every``-th."""

    def __init__(self, first: int = 10, every: int = 1000) -> None:
        self.first = first
        self.every = every
        self.count = 0

    def refuse(self, reason: str) -> None:
        self.count += 1
        if self.count <= self.first or self.count % self.every == 0:
            log.warning("refused a message from the guest (%d so far): %s", self.count, printable(reason[:200]))


refusals = Refusals()


def refuse(reason: str) -> None:
    refusals.refuse(reason)


# -- per op --------------------------------------------------------------------------------------------------


def _hello(m: dict[str, Any]) -> Hello:
    uptime = m.get("uptime")
    if uptime is not None and (isinstance(uptime, bool) or not isinstance(uptime, int | float) or uptime < 0):
        raise BadGuestMessage(f"hello: bad uptime {_show(uptime)}")
    return Hello(_int(m, "version", 0, 1 << 31), None if uptime is None else float(uptime))


def _exit(m: dict[str, Any]) -> Exit:
    return Exit(_text(m, "id", MAX_ID), _int(m, "sid", 1, MAX_SID, default=1), _int(m, "code", 0, MAX_CODE),
                _text(m, "message", MAX_TEXT, default=None))


def _log(m: dict[str, Any]) -> Log:
    return Log(_text(m, "message", MAX_TEXT))


def _syslog(m: dict[str, Any]) -> Syslog:
    return Syslog(_text(m, "id", MAX_ID), _text(m, "message", MAX_TEXT))


def _ok(m: dict[str, Any]) -> Reply:
    fields = {k: v for k, v in m.items() if k not in ("op", "req")}
    return Reply(_int(m, "req", 1, MAX_COUNTER), True, fields=fields)


def _error(m: dict[str, Any]) -> Reply:
    return Reply(_int(m, "req", 1, MAX_COUNTER), False, _text(m, "message", MAX_TEXT, default="") or "",
                 _int(m, "code", 0, MAX_CODE, default=125))


_PARSERS: dict[str, Callable[[dict[str, Any]], GuestMessage]] = {
    HELLO: _hello, EXIT: _exit, LOG: _log, SYSLOG: _syslog, OK: _ok, ERROR: _error,
}

_MISSING = object()


def _int(m: dict[str, Any], name: str, low: int, high: int, default: Any = _MISSING) -> int:
    value = m.get(name, default)
    if value is _MISSING:
        raise BadGuestMessage(f"{m['op']}: {name} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadGuestMessage(f"{m['op']}: {name} {_show(value)} is not an integer in {low}..{high}")
    return value


def _text(m: dict[str, Any], name: str, limit: int, default: Any = _MISSING) -> Any:
    value = m.get(name, default)
    if value is _MISSING:
        raise BadGuestMessage(f"{m['op']}: {name} is missing")
    if value is default:
        return value
    if not isinstance(value, str) or len(value) > limit:
        raise BadGuestMessage(f"{m['op']}: {name} is not a string of at most {limit} characters: {_show(value)}")
    return value


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
