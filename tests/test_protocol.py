import socket

import pytest

from micropod import wire


def test_frames_survive_arbitrary_splits() -> None:
    stream = (wire.encode_control({"op": "hello", "version": 1})
              + wire.encode(wire.DATA, wire.stream_id(1, 1), b"hi\n")
              + wire.encode(wire.EOF, wire.stream_id(1, 1)))
    for size in (1, 2, 5, 9, 64):
        reader = wire.FrameReader()
        frames = []
        for i in range(0, len(stream), size):
            frames += reader.feed(stream[i:i + size])
        assert reader.pending == 0
        assert frames[0][0] == wire.CONTROL
        assert wire.decode_control(frames[0][2]) == {"op": "hello", "version": 1}
        assert frames[1] == (wire.DATA, 5, b"hi\n")
        assert frames[2] == (wire.EOF, 5, b"")


def test_stream_ids() -> None:
    assert wire.split_stream(wire.stream_id(7, wire.STDERR)) == (7, 2)


@pytest.mark.parametrize("payload", [b"not json", b"[1]", b'{"no_op": 1}'])
def test_bad_control(payload: bytes) -> None:
    with pytest.raises(wire.FrameError):
        wire.decode_control(payload)


def test_bad_header_and_oversize() -> None:
    with pytest.raises(wire.FrameError):
        wire.FrameReader().feed(wire.HEADER.pack(9, 0, 0))
    with pytest.raises(wire.FrameError):
        wire.FrameReader().feed(wire.HEADER.pack(wire.DATA, 0, wire.MAX_PAYLOAD + 1))
    with pytest.raises(wire.FrameError):
        wire.encode(wire.DATA, 1, b"x" * (wire.MAX_PAYLOAD + 1))


def test_recv_frame_and_closed_mid_frame() -> None:
    a, b = socket.socketpair()
    a.sendall(wire.encode(wire.DATA, 5, b"abc"))
    assert wire.recv_frame(b) == (wire.DATA, 5, b"abc")
    a.sendall(wire.encode(wire.DATA, 5, b"abcdef")[:-2])
    a.close()
    with pytest.raises(wire.FrameError, match="mid-frame"):
        wire.recv_frame(b)
