"""The wire contract between host and guest: one framed protocol for the agent channel (vsock or
virtio-serial) and the monitor's control socket, and the agent channel's ops (``GuestOp``). The host and the
agent both import it, and nothing else of each other's (the monitor socket's own ops are micropod/monitor/api.py).

A frame is a 9-byte header, ``!BII`` = (kind, stream, length), then ``length`` payload bytes.

- ``CONTROL`` frames (stream 0) carry one JSON object with an ``op`` key.
- ``DATA`` frames carry raw bytes of one stream; ``EOF`` frames (empty payload) close it.

Stream ids: a process started through the agent gets a session number ``sid`` (>= 1) from the host,
and its stdio streams are ``sid * 4 + fd`` (fd 0 stdin, 1 stdout, 2 stderr). Control messages name
containers by id from day one (``main`` for ``run``), so a VM can later hold a whole pod.

Ops, host -> agent: ``create`` {id, spec}, ``start`` {id}, ``signal`` {id, signal}, ``exec`` {id, sid, spec},
``resize`` {sid, rows, cols}, ``stats`` {} (the guest's CPU, memory and block counters), ``shutdown`` {},
``restore`` {entropy, time}, ``network`` {...}, ``archive-get`` {id, sid, path}, ``archive-put`` {id, sid, path},
``remove`` {id}, ``update`` {id, and any of pids_limit, memory_limit, cpu_quota, cpu_shares, cpuset_cpus,
cpuset_mems: those given change, 0 lifting a count's or the quota's limit; a cpu_quota is CPUs, a CFS quota over
``CPU_PERIOD``}. ``create`` may carry ``disks`` {address: bytes}: a pod's disks
added after boot (a swapped placeholder ``/dev/vdX``, or a hot-added SCSI disk ``scsi:N``), which the agent
waits to see, at that size, before it mounts them (micropod/agent/hotdisk.py). ``stats`` with an ``id``: that
pod container's own cgroup counters.
Replies carry the request's ``req`` and are ``ok`` or
``error`` {message, code}. Agent -> host, unsolicited: ``hello`` {version}, ``exit`` {id, sid, code},
``log`` {message}, ``syslog`` {id, message} (one datagram from the container's /dev/log).
The host checks every field of what the agent sends (micropod/guestmsg.py). Decoding refuses NaN, the
infinities (``1e400`` included) and nesting deeper than ``MAX_DEPTH``, on both sides.

Stdlib only: this module runs in the guest, on the boot path of every VM, so it avoids ``json``
(which pulls in ``re`` and ``enum``) and ``socket``/``typing``; the C accelerator ``_json`` that ``json``
itself uses does the real work. tests/test_protocol.py checks the bytes against the ``json`` module.
"""

from __future__ import annotations

import _json
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol

    class Receiver(Protocol):
        def recv(self, size: int, /) -> bytes: ...

VERSION = 1
HEADER = struct.Struct("!BII")
MAX_PAYLOAD = 1 << 20
MAX_DEPTH = 32  # nesting of a control message: the C scanner recurses, so bound it before it runs

CONTROL = 0
DATA = 1
EOF = 2

STDIN, STDOUT, STDERR = 0, 1, 2


CPU_PERIOD = 100_000  # µs: the cgroup CPU period of a container's cpu_quota


class GuestOp:
    """The ``op`` of every control message on the agent channel, for the host and the agent alike (the fields
    of each are in the module's docstring)."""

    # host -> agent, each answered by OK or ERROR with the request's ``req``
    CREATE = "create"
    START = "start"
    EXEC = "exec"
    SIGNAL = "signal"
    RESIZE = "resize"
    STATS = "stats"
    SHUTDOWN = "shutdown"
    RESTORE = "restore"  # after a snapshot restore: entropy and the clock
    NETWORK = "network"  # the guest's address, routes and DNS
    ARCHIVE_GET = "archive-get"  # cp out: a tar of a path on the stream of the request's sid
    ARCHIVE_PUT = "archive-put"  # cp in: a tar streamed in on the sid's stdin
    REMOVE = "remove"  # a pod's container: its processes killed, its filesystems unmounted, forgotten
    UPDATE = "update"  # a running container's cgroup limits (`micropod update`)
    # replies
    OK = "ok"
    ERROR = "error"
    # agent -> host, unsolicited
    HELLO = "hello"
    EXIT = "exit"
    LOG = "log"
    SYSLOG = "syslog"


class FrameError(Exception):
    """A malformed frame, a malformed control message, or a channel closed mid-frame."""


def stream_id(sid: int, fd: int) -> int:
    return sid * 4 + fd


def split_stream(stream: int) -> tuple[int, int]:
    return stream // 4, stream % 4


def encode(kind: int, stream: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(kind, stream, len(payload)) + payload


def _unserialisable(value: object) -> object:
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# Same settings as json.dumps(message, separators=(",", ":")): ASCII escapes, no sorting, NaN allowed.
_encode_json = _json.make_encoder(
    None, _unserialisable, _json.encode_basestring_ascii, None, ":", ",", False, False, True
)


def encode_control(message: dict[str, Any]) -> bytes:
    return encode(CONTROL, 0, "".join(_encode_json(message, 0)).encode())


class _DecoderSettings:
    """The attributes the C scanner reads from json.JSONDecoder, with json.loads' defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_int = int

    @staticmethod
    def parse_float(text: str) -> float:
        value = float(text)
        if value - value != 0.0:  # 1e400 is infinite: no counter or time is
            raise ValueError(f"non-finite number {text[:20]}")
        return value

    @staticmethod
    def parse_constant(text: str) -> float:
        raise ValueError(f"non-finite number {text}")


_scan_json = _json.make_scanner(_DecoderSettings())  # type: ignore[arg-type]  # typeshed is odd here
_JSON_WHITESPACE = " \t\n\r"


def _nesting(text: str) -> int:
    """How deep arrays and objects nest in ``text``, brackets inside strings not counted."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def decode_control(payload: bytes) -> dict[str, Any]:
    try:
        text = payload.decode()
        # Counting brackets is cheap and almost always settles it; the exact scan runs only when it cannot.
        if text.count("[") + text.count("{") > MAX_DEPTH and _nesting(text) > MAX_DEPTH:
            raise FrameError(f"control frame nests deeper than {MAX_DEPTH}")
        start = len(text) - len(text.lstrip(_JSON_WHITESPACE))
        message, end = _scan_json(text, start)
    except StopIteration:
        raise FrameError("control frame is not JSON: expecting a value") from None
    except ValueError as exc:  # UnicodeDecodeError and json's JSONDecodeError
        raise FrameError(f"control frame is not JSON: {exc}") from exc
    if text[end:].strip(_JSON_WHITESPACE):
        raise FrameError("control frame is not JSON: extra data")
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise FrameError("control frame lacks an 'op'")
    return message


class FrameReader:
    """Incremental decoder: feed bytes as they arrive, take whole frames out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self._buf += data
        frames = []
        while len(self._buf) >= HEADER.size:
            kind, stream, length = HEADER.unpack_from(self._buf)
            if kind not in (CONTROL, DATA, EOF) or length > MAX_PAYLOAD:
                raise FrameError(f"bad frame header kind={kind} length={length}")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append((kind, stream, bytes(self._buf[HEADER.size:end])))
            del self._buf[:end]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf)


def recv_frame(sock: Receiver) -> tuple[int, int, bytes]:
    """Blocking read of exactly one frame."""
    header = _recv_exact(sock, HEADER.size)
    kind, stream, length = HEADER.unpack(header)
    if kind not in (CONTROL, DATA, EOF) or length > MAX_PAYLOAD:
        raise FrameError(f"bad frame header kind={kind} length={length}")
    return kind, stream, _recv_exact(sock, length)


def _recv_exact(sock: Receiver, n: int) -> bytes:
    chunks: list[bytes] = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise FrameError("channel closed mid-frame" if chunks else "channel closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)
