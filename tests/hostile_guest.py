"""A hostile guest for end-to-end tests: a script shipped in a test image that becomes the guest's PID 1.

With MICROPOD_TEST_HOSTILE_GUEST=1 in micropod's environment, the VM boots with the agent's handover switch
(micropod/agent/handover.py): at ``start`` the agent execs ``python3.11 -I -S /mnt/root/hostile.py ARGS`` and
this script, which came from an untrusted image, owns the channel to the host. It then does what a container
that took over its guest could do: send anything, answer requests as it likes, stop reading.

This one file is both sides:
- host side (``build_image``, ``HostileCli``), imported by tests/test_e2e_hostile.py;
- guest side (``main``), run in the VM with the guest's stdlib only, so its top-level imports stay stdlib and
  it frames by hand with ``struct`` rather than through micropod's codec (malformed frames are the point).

    MICROPOD_TEST_HOSTILE_GUEST=1 micropod run --rm hostile /hostile.py flood 1048576

Scenarios (first argument): ``malformed``, ``flood BYTES``, ``deaf``, ``console-flood BYTES``,
``evil-tar VICTIM``, ``idle``; see each function.
"""

from __future__ import annotations

import json
import os
import select
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct("!BII")
CONTROL, DATA, EOF = 0, 1, 2
STDOUT = 1
PWNED = "\x1b]0;pwned\x07"  # sets the terminal's title if echoed raw: micropod's messages must escape it
IMAGE_REF = "localhost/hostile:latest"
SCRIPT = "/hostile.py"
CHUNK = 1 << 16


def pattern(offset: int, size: int) -> bytes:
    """The flood's bytes at ``offset``: byte i of the stream is i % 251, so a lost or moved chunk shows."""
    start = offset % 251
    return _BASE[start:start + size]


_BASE = bytes(range(251)) * ((CHUNK + 251) // 251 + 1)


# --- guest side -----------------------------------------------------------------------------------------------


class Channel:
    """The agent's channel fd, inherited across the handover; blocking, so a host that stops reading stalls us."""

    def __init__(self) -> None:
        self.fd = int(os.environ["MICROPOD_HANDOVER_FD"])
        self.cid = os.environ.get("MICROPOD_HANDOVER_ID", "main")
        self.sid = int(os.environ.get("MICROPOD_HANDOVER_SID", "1"))
        os.set_blocking(self.fd, True)
        self.buffer = bytearray()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def frame(self, kind: int, stream: int, payload: bytes = b"") -> None:
        self.write(HEADER.pack(kind, stream, len(payload)) + payload)

    def raw_control(self, payload: bytes) -> None:
        self.frame(CONTROL, 0, payload)

    def control(self, **message: Any) -> None:
        self.raw_control(json.dumps(message, separators=(",", ":")).encode())

    def stdout(self, data: bytes) -> None:
        self.frame(DATA, self.sid * 4 + STDOUT, data)

    def reply(self, request: dict[str, Any], **fields: Any) -> None:
        self.control(op="ok", req=request.get("req"), **fields)

    def next_request(self) -> dict[str, Any]:
        """The next control message from the host (stdin frames are dropped); waits while the host is away."""
        while True:
            while len(self.buffer) >= HEADER.size:
                kind, _, length = HEADER.unpack_from(self.buffer)
                if len(self.buffer) < HEADER.size + length:
                    break
                payload = bytes(self.buffer[HEADER.size:HEADER.size + length])
                del self.buffer[:HEADER.size + length]
                if kind == CONTROL:
                    message = json.loads(payload)
                    if isinstance(message, dict):
                        return message
            data = os.read(self.fd, 1 << 16)
            if not data:  # a virtio-serial port reads as EOF while the host side is not connected
                select.select([], [], [], 0.2)
            self.buffer += data


def say(message: str) -> None:
    """A line on the console (fd 2 is the kernel's console, as for the agent), for failing tests' tails."""
    os.write(2, f"hostile-guest: {message}\n".encode())


def serve(ch: Channel, handlers: dict[str, Callable[[Channel, dict[str, Any]], None]] | None = None) -> None:
    """Answer the host like a plain agent would, except for ``handlers``; ``shutdown`` ends PID 1 (so the VM)."""
    handlers = handlers or {}
    while True:
        request = ch.next_request()
        op = request.get("op")
        say(f"request {op!r}")
        if op in handlers:
            handlers[str(op)](ch, request)
        elif op == "shutdown":
            ch.reply(request)
            os._exit(0)
        elif op == "signal":
            ch.reply(request)
            ch.control(op="exit", id=ch.cid, sid=ch.sid, code=128 + int(request.get("signal") or 15))
        elif op == "stats":
            ch.reply(request, cpu_total=1, cpu_idle=0, cpus=1, mem_used=1, mem_total=2, block_read=0,
                     block_write=0, pids=1)
        else:
            ch.reply(request)


def malformed(ch: Channel, args: list[str]) -> None:
    """One of each bad message (BAD_MESSAGES refusals in monitor.log), then ``ready``; stats come back with
    1e400, a cp gets an error full of control characters, and ``stop``'s signal gets a garbage frame."""
    for payload in bad_messages(ch.cid):
        ch.raw_control(payload)
    ch.control(op="log", message=f"guest log line {PWNED}")
    ch.stdout(b"ready\n")

    def stats(ch: Channel, request: dict[str, Any]) -> None:
        ch.raw_control(b'{"op":"ok","req":%d,"cpu_total":1e400,"cpu_idle":0,"cpus":1,"mem_used":1,'
                       b'"mem_total":2,"block_read":0,"block_write":0,"pids":1}' % int(request["req"]))

    def archive(ch: Channel, request: dict[str, Any]) -> None:
        ch.control(op="error", req=request.get("req"), message=f"no such file {PWNED}", code=1)

    def garbage(ch: Channel, request: dict[str, Any]) -> None:
        ch.write(HEADER.pack(CONTROL, 0, 0xFFFFFFFF) + b"\xff" * 4096)  # a 4 GiB frame, then noise
        while True:
            time.sleep(3600)

    serve(ch, {"stats": stats, "archive-get": archive, "signal": garbage})


def bad_messages(cid: str) -> list[bytes]:
    """Each must be refused with one line in monitor.log, and none may end the container."""
    deep = 10_000
    return [
        b'{"op":"exit","id":"%s","sid":1,"code":1099511627776}' % cid.encode(),  # 2**40
        b'{"op":"exit","id":"%s","sid":1,"code":1e400}' % cid.encode(),
        b'{"op":"log","message":' + b"[" * deep + b"]" * deep + b"}",
        b'{"op":"pwn","payload":"x"}',
        b'{"op":"error","req":987654,"message":"late \\u001b]0;pwned\\u0007"}',  # a reply nobody waits for
        b'{"op":"exit","id":"%s","sid":77,"code":0,"message":"\\u001b]0;pwned\\u0007"}' % cid.encode(),
        b'{"op":"syslog","id":"%s","message":12}' % cid.encode(),
        b"not json at all \x1b]0;pwned\x07",
    ]


def flood(ch: Channel, args: list[str]) -> None:
    """BYTES of stdout as fast as the channel takes them (the pattern), then the exit."""
    total = int(args[0])
    sent = 0
    while sent < total:
        size = min(CHUNK, total - sent)
        ch.stdout(pattern(sent, size))
        sent += size
    ch.frame(EOF, ch.sid * 4 + STDOUT)
    ch.control(op="exit", id=ch.cid, sid=ch.sid, code=0)
    serve(ch)


def deaf(ch: Channel, args: list[str]) -> None:
    """Say ``ready``, then never read the channel again: whatever the host sends piles up in front of us."""
    ch.stdout(b"ready\n")
    while True:
        time.sleep(3600)


def console_flood(ch: Channel, args: list[str]) -> None:
    """BYTES to the serial console, the last line a terminal escape; then PID 1 exits, which ends the VM."""
    total = int(args[0])
    ch.stdout(b"flooding\n")
    line = b"console flood from a hostile guest " + b"x" * 92 + b"\n"  # 128 bytes
    block = line * 64
    fd = os.open("/dev/ttyS0", os.O_WRONLY | os.O_NOCTTY)
    written = 0
    while written < total:
        written += os.write(fd, block)
    os.write(fd, f"last words {PWNED}\n".encode())
    os._exit(3)


def evil_tar(ch: Channel, args: list[str]) -> None:
    """Answer ``cp`` out with a tar whose hard link names VICTIM, a host file outside the destination, and whose
    next member of the same name would overwrite it (setuid, other owner) if the host followed the link."""
    import io
    import tarfile

    victim = args[0]

    def member(name: str, kind: bytes, data: bytes = b"", link: str = "", mode: int = 0o644) -> tuple[Any, Any]:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode, info.uid, info.gid = kind, link, mode, 4321, 4321
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        return info, io.BytesIO(data) if kind == tarfile.REGTYPE else None

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in (
            member("x", tarfile.DIRTYPE, mode=0o755),
            member("x/h", tarfile.LNKTYPE, link=victim),
            member("x/h", tarfile.REGTYPE, b"pwned by the guest\n", mode=0o6777),
            member("x/up", tarfile.LNKTYPE, link="../" * 40 + victim.lstrip("/")),
            member("x/up", tarfile.REGTYPE, b"pwned by the guest\n", mode=0o6777),
        ):
            tar.addfile(info, data)
    tarball = buf.getvalue()

    def archive(ch: Channel, request: dict[str, Any]) -> None:
        sid = int(request["sid"])
        for offset in range(0, len(tarball), CHUNK):
            ch.frame(DATA, sid * 4 + STDOUT, tarball[offset:offset + CHUNK])
        ch.frame(EOF, sid * 4 + STDOUT)
        ch.control(op="exit", id=ch.cid, sid=sid, code=0)
        ch.reply(request, size=len(tarball))

    ch.stdout(b"ready\n")
    serve(ch, {"archive-get": archive})


def idle(ch: Channel, args: list[str]) -> None:
    """A well-behaved stand-in for the agent: ``ready``, then plain answers."""
    ch.stdout(b"ready\n")
    serve(ch)


SCENARIOS: dict[str, Callable[[Channel, list[str]], None]] = {
    "malformed": malformed, "flood": flood, "deaf": deaf, "console-flood": console_flood, "evil-tar": evil_tar,
    "idle": idle,
}


def main(argv: list[str]) -> None:
    ch = Channel()
    name = argv[1] if len(argv) > 1 else "idle"
    say(f"PID {os.getpid()} owns the channel (fd {ch.fd}); scenario {name} {argv[2:]}")
    SCENARIOS[name](ch, argv[2:])


# --- host side ------------------------------------------------------------------------------------------------


def build_image(layout: Any) -> str:
    """An OCI layout at ``layout`` holding IMAGE_REF: this file as /hostile.py and the directories a container
    root needs; returns the manifest digest."""
    from pathlib import Path

    from tests.imagetools import compress, d, f, layer_tar, oci_layout

    source = Path(__file__).read_bytes()
    entries = [d(name) for name in ("dev", "etc", "proc", "sys", "tmp", "root")]
    entries.append(f(SCRIPT.lstrip("/"), source, mode=0o755))
    return oci_layout(Path(layout), [compress(layer_tar(entries), "none")], ref=IMAGE_REF,
                      config={"config": {"Cmd": [SCRIPT, "idle"]}})


if __name__ == "__main__":
    main(sys.argv)
