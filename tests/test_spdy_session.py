"""The SPDY session's bounds (micropod/cri/streaming/spdy.py), driven by the test client (tests/spdy_client.py)
over a socketpair: what a client sends unread is held within a byte budget, a stream nobody reads is reset
instead of holding the session, and finished streams are forgotten so a long session is not refused."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from micropod.cri.streaming import spdy
from tests import spdy_client


class Pair:
    def __init__(self, on_stream: Callable[[spdy.Stream], None]) -> None:
        ours, theirs = socket.socketpair()
        self.server = spdy.Session(ours, on_stream)
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()
        self.client = spdy_client.Session(spdy_client.Conn(theirs))

    def close(self) -> None:
        self.client.close()
        self.server.close()
        self.thread.join(5)


@pytest.fixture
def pairs() -> Iterator[list[Pair]]:
    made: list[Pair] = []
    yield made
    for pair in made:
        pair.close()


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


def test_unread_data_stays_within_the_budget_and_an_unread_stream_is_reset(
        pairs: list[Pair], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spdy, "UNREAD_TIMEOUT", 1.0)
    echoed: list[bytes] = []

    def on_stream(stream: spdy.Stream) -> None:
        if stream.header("streamtype") == "echo":
            threading.Thread(target=lambda: echoed.append(stream.read() or b""), daemon=True).start()

    pair = Pair(on_stream)
    pairs.append(pair)
    unread = pair.client.open({"streamType": "ignored"})
    chunk = b"x" * (32 << 10)

    def flood() -> None:
        for _ in range(64):  # 2 MiB, eight times what a stream may hold
            unread.write(chunk)

    threading.Thread(target=flood, daemon=True).start()
    peak = 0
    deadline = time.monotonic() + 10
    while unread.reset is None and time.monotonic() < deadline:
        peak = max(peak, pair.server.queued)
        time.sleep(0.01)
    assert unread.reset == spdy.RST_CANCEL
    assert 0 < peak <= spdy.STREAM_QUEUE_BYTES + len(chunk), peak
    # the session goes on: another stream is read, and the reset one holds nothing any more
    echo = pair.client.open({"streamType": "echo"})
    echo.write(b"still here")
    wait_for(lambda: echoed == [b"still here"])
    assert unread.stream_id not in pair.server.streams


def test_finished_streams_are_forgotten_so_a_long_session_is_not_refused(pairs: list[Pair]) -> None:
    def on_stream(stream: spdy.Stream) -> None:
        def finish() -> None:
            while stream.read() is not None:
                pass
            stream.close()

        threading.Thread(target=finish, daemon=True).start()

    pair = Pair(on_stream)
    pairs.append(pair)
    for _ in range(spdy.MAX_STREAMS * 2):  # one port-forward connection after another
        stream = pair.client.open({"streamType": "data"})
        assert stream.reset is None
        stream.write(b"payload")
        stream.close()
        stream.read_all(10)
    wait_for(lambda: not pair.server.streams)
    assert pair.server.queued == 0


def test_a_reused_stream_id_is_refused(pairs: list[Pair]) -> None:
    pair = Pair(lambda stream: None)
    pairs.append(pair)
    first = pair.client.open({"streamType": "data"})
    with pair.client._lock:  # the same id again, its header block in the client's zlib context
        payload = struct.pack(">IIH", first.stream_id, 0, 0) + pair.client._headers({"streamType": "data"})
        pair.client.conn.sock.sendall(spdy_client.control(spdy.SYN_STREAM, 0, payload))
    wait_for(lambda: first.reset is not None)
    assert first.reset == spdy.RST_REFUSED


def test_a_session_opens_a_bounded_number_of_streams_in_its_life(pairs: list[Pair],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The handlers keep what they were given for the session's life: forgetting finished streams must not
    let one session open streams without end."""
    monkeypatch.setattr(spdy, "MAX_SESSION_STREAMS", 5)
    pair = Pair(lambda stream: None)
    pairs.append(pair)
    for _ in range(5):
        opened = pair.client.open({"streamType": "data"})
        pair.client.send(spdy_client.control(spdy.RST_STREAM, 0, struct.pack(">II", opened.stream_id, 5)))
        assert opened.reset is None
    refused = pair.client.open({"streamType": "data"})
    assert refused.reset == spdy.RST_REFUSED


def test_a_slow_reader_that_reads_is_never_reset(pairs: list[Pair], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spdy, "UNREAD_TIMEOUT", 0.6)
    received: list[bytes] = []

    def on_stream(stream: spdy.Stream) -> None:
        def slowly() -> None:
            while (data := stream.read()) is not None:
                received.append(data)
                time.sleep(0.15)

        threading.Thread(target=slowly, daemon=True).start()

    pair = Pair(on_stream)
    pairs.append(pair)
    stream = pair.client.open({"streamType": "stdin"})
    chunk = b"z" * (64 << 10)
    for _ in range(24):  # 1.5 MiB: over the budget, so the session waits on the reader for seconds
        stream.write(chunk)
    stream.close()
    wait_for(lambda: sum(map(len, received)) == 24 * len(chunk), timeout=30)
    assert stream.reset is None
