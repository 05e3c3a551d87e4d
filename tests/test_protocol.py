import socket

import pytest

from micropod.agent import protocol


def test_frames_survive_arbitrary_splits() -> None:
    wire = (protocol.encode_control({"op": "hello", "version": 1})
            + protocol.encode(protocol.DATA, protocol.stream_id(1, 1), b"hi\n")
            + protocol.encode(protocol.EOF, protocol.stream_id(1, 1)))
    for size in (1, 2, 5, 9, 64):
        reader = protocol.FrameReader()
        frames = []
        for i in range(0, len(wire), size):
            frames += reader.feed(wire[i:i + size])
        assert reader.pending == 0
        assert frames[0][0] == protocol.CONTROL
        assert protocol.decode_control(frames[0][2]) == {"op": "hello", "version": 1}
        assert frames[1] == (protocol.DATA, 5, b"hi\n")
        assert frames[2] == (protocol.EOF, 5, b"")


def test_stream_ids() -> None:
    assert protocol.split_stream(protocol.stream_id(7, protocol.STDERR)) == (7, 2)


@pytest.mark.parametrize("payload", [b"not json", b"[1]", b'{"no_op": 1}'])
def test_bad_control(payload: bytes) -> None:
    with pytest.raises(protocol.FrameError):
        protocol.decode_control(payload)


def test_bad_header_and_oversize() -> None:
    with pytest.raises(protocol.FrameError):
        protocol.FrameReader().feed(protocol.HEADER.pack(9, 0, 0))
    with pytest.raises(protocol.FrameError):
        protocol.FrameReader().feed(protocol.HEADER.pack(protocol.DATA, 0, protocol.MAX_PAYLOAD + 1))
    with pytest.raises(protocol.FrameError):
        protocol.encode(protocol.DATA, 1, b"x" * (protocol.MAX_PAYLOAD + 1))


def test_recv_frame_and_closed_mid_frame() -> None:
    a, b = socket.socketpair()
    a.sendall(protocol.encode(protocol.DATA, 5, b"abc"))
    assert protocol.recv_frame(b) == (protocol.DATA, 5, b"abc")
    a.sendall(protocol.encode(protocol.DATA, 5, b"abcdef")[:-2])
    a.close()
    with pytest.raises(protocol.FrameError, match="mid-frame"):
        protocol.recv_frame(b)
