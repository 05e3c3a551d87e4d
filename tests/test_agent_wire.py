"""The agent's codec must produce and accept exactly the bytes of protocol.py, the contract."""

from __future__ import annotations

from typing import Any

import pytest

from micropod.agent import main as agent_main
from micropod.agent import protocol, wire
from micropod.vmm import base

MESSAGES: list[dict[str, Any]] = [
    {"op": "hello", "version": 1},
    {"op": "create", "req": 1, "id": "main", "spec": {"args": ["sh", "-c", "echo 'hi' \"there\""],
                                                      "env": ["A=é", "B=\u2028\x00"], "tty": False,
                                                      "user": "", "rootfs": {"lower": "/dev/vdb"}}},
    {"op": "exit", "id": "main", "sid": 1, "code": 143, "ratio": 0.5, "none": None, "list": [[], {}]},
    {"op": "log", "message": "emoji \U0001F600 and a \\ backslash"},
]


def test_constants_match_the_contract() -> None:
    assert (wire.VERSION, wire.MAX_PAYLOAD, wire.HEADER.format) == (protocol.VERSION, protocol.MAX_PAYLOAD,
                                                                   protocol.HEADER.format)
    assert (wire.CONTROL, wire.DATA, wire.EOF) == (protocol.CONTROL, protocol.DATA, protocol.EOF)
    assert (wire.STDIN, wire.STDOUT, wire.STDERR) == (protocol.STDIN, protocol.STDOUT, protocol.STDERR)
    assert wire.stream_id(3, 2) == protocol.stream_id(3, 2)
    assert (agent_main.AGENT_SERIAL_NAME, agent_main.AGENT_VSOCK_PORT) == (base.AGENT_SERIAL_NAME,
                                                                          base.AGENT_VSOCK_PORT)


@pytest.mark.parametrize("message", MESSAGES)
def test_same_bytes_both_ways(message: dict[str, Any]) -> None:
    assert wire.encode_control(message) == protocol.encode_control(message)
    payload = protocol.encode_control(message)[protocol.HEADER.size:]
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


def test_reader_matches_protocol_reader() -> None:
    stream = b"".join([
        wire.encode_control({"op": "hello", "version": 1}),
        wire.encode(wire.DATA, wire.stream_id(1, 1), b"x" * 5000),
        wire.encode(wire.EOF, wire.stream_id(1, 1)),
    ])
    for size in (1, 7, 4096):
        ours, theirs = wire.FrameReader(), protocol.FrameReader()
        got, want = [], []
        for i in range(0, len(stream), size):
            got += ours.feed(stream[i:i + size])
            want += theirs.feed(stream[i:i + size])
        assert got == want and len(got) == 3


def test_reader_rejects_bad_headers() -> None:
    with pytest.raises(wire.FrameError):
        wire.FrameReader().feed(protocol.HEADER.pack(9, 0, 0))
    with pytest.raises(wire.FrameError):
        wire.FrameReader().feed(protocol.HEADER.pack(wire.DATA, 0, wire.MAX_PAYLOAD + 1))
