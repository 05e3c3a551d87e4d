"""compression.Readahead: a layer read and inflated by a thread of its own, a bounded few chunks ahead."""

from __future__ import annotations

import io
import threading
import zlib

import pytest

from micropod.image.compression import Readahead


def test_it_reads_the_source_in_order_whatever_the_sizes_asked() -> None:
    data = bytes(range(256)) * 5000
    ahead = Readahead(io.BytesIO(data), chunk=1000, depth=2)
    got = bytearray()
    for size in (1, 7, 999, 4096, 65536):
        got += ahead.read(size)
    got += ahead.read()
    assert bytes(got) == data and ahead.read(10) == b""
    ahead.close()


def test_an_error_of_the_source_reaches_the_reader_after_what_came_before() -> None:
    class Broken(io.RawIOBase):
        def __init__(self) -> None:
            self.calls = 0

        def read(self, size: int = -1) -> bytes:
            self.calls += 1
            if self.calls > 2:
                raise zlib.error("corrupt")
            return b"x" * size

    ahead = Readahead(Broken(), chunk=10, depth=1)  # type: ignore[arg-type]
    assert ahead.read(10) + ahead.read(10) == b"x" * 20
    with pytest.raises(zlib.error, match="corrupt"):
        ahead.read(10)
    ahead.close()


def test_close_ends_a_thread_that_waits_on_a_full_queue() -> None:
    class Endless(io.RawIOBase):
        def read(self, size: int = -1) -> bytes:
            return b"y" * size

    ahead = Readahead(Endless(), chunk=10, depth=1)  # type: ignore[arg-type]
    assert ahead.read(5) == b"y" * 5
    ahead.close()
    assert not any(t.name == "layer-readahead" and t.is_alive() for t in threading.enumerate())
