"""The light codec in wire.py must produce and accept exactly the bytes the json module does."""

from __future__ import annotations

import json
from typing import Any

import pytest

from micropod import wire
from micropod.agent import entry as agent_main
from micropod.vmm import base

MESSAGES: list[dict[str, Any]] = [
    {"op": "hello", "version": 1},
    {"op": "create", "req": 1, "id": "main", "spec": {"args": ["sh", "-c", "echo 'hi' \"there\""],
                                                      "env": ["A=é", "B=\u2028\x00"], "tty": False,
                                                      "user": "", "rootfs": {"lower": "/dev/vdb"}}},
    {"op": "exit", "id": "main", "sid": 1, "code": 143, "ratio": 0.5, "none": None, "list": [[], {}]},
    {"op": "log", "message": "emoji \U0001F600 and a \\ backslash"},
]


def test_agent_uses_the_host_constants() -> None:
    assert (agent_main.AGENT_SERIAL_NAME, agent_main.AGENT_VSOCK_PORT) == (base.AGENT_SERIAL_NAME,
                                                                          base.AGENT_VSOCK_PORT)


@pytest.mark.parametrize("message", MESSAGES)
def test_same_bytes_both_ways(message: dict[str, Any]) -> None:
    payload = json.dumps(message, separators=(",", ":")).encode()
    assert wire.encode_control(message) == wire.HEADER.pack(wire.CONTROL, 0, len(payload)) + payload
    assert wire.decode_control(payload) == message
    assert wire.decode_control(b"  \n" + payload + b"\n ") == message


@pytest.mark.parametrize("payload", [b"", b"not json", b"{", b"[1]", b'{"no_op": 1}', b'{"op": 2}',
                                     b'{"op": "x"} trailing', b"\xff\xfe"])
def test_bad_control_is_a_frame_error(payload: bytes) -> None:
    with pytest.raises(wire.FrameError):
        wire.decode_control(payload)


def test_unserialisable_values_are_refused() -> None:
    with pytest.raises(TypeError):
        wire.encode_control({"op": "x", "value": object()})


def test_reader_reassembles_any_split() -> None:
    stream = b"".join([
        wire.encode_control({"op": "hello", "version": 1}),
        wire.encode(wire.DATA, wire.stream_id(1, 1), b"x" * 5000),
        wire.encode(wire.EOF, wire.stream_id(1, 1)),
    ])
    for size in (1, 7, 4096):
        reader = wire.FrameReader()
        got = []
        for i in range(0, len(stream), size):
            got += reader.feed(stream[i:i + size])
        assert [f[0] for f in got] == [wire.CONTROL, wire.DATA, wire.EOF]
        assert got[1][2] == b"x" * 5000


def test_reader_rejects_bad_headers() -> None:
    with pytest.raises(wire.FrameError):
        wire.FrameReader().feed(wire.HEADER.pack(9, 0, 0))
    with pytest.raises(wire.FrameError):
        wire.FrameReader().feed(wire.HEADER.pack(wire.DATA, 0, wire.MAX_PAYLOAD + 1))
