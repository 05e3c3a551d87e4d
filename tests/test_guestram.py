"""The snapshot's shared guest RAM (micropod/vmm/guestram.py): one sealed copy per image, held across VMs."""


import json
import mmap
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from micropod.errors import BootError
from micropod.vmm import guestram

PAGE = 4096


SIZE = 1 << 20


def write_snapshot(path: Path, first: bytes = b"") -> None:
    """A snapshot file: 1 MiB of RAM with two touched pages and holes elsewhere, then its stream."""
    with path.open("wb") as f:
        f.write(first)
        f.truncate(SIZE)
        f.seek(PAGE)
        f.write(b"kernel" * 10)
        f.seek(200 * PAGE)
        f.write(b"agent")
        f.seek(SIZE)
        f.write(b"QEVM stream")


@pytest.fixture
def image(tmp_path: Path) -> Iterator[Path]:
    """A snapshot file; its RAM's holder is ended afterwards."""
    path = tmp_path / "k.qemu"
    write_snapshot(path)
    yield path
    guestram.release(path)


def shared_copy(snapshot: Path) -> guestram.GuestRam:
    fd = os.open(snapshot, os.O_RDONLY)
    try:
        return guestram.clone_ram(snapshot, fd, SIZE)
    finally:
        os.close(fd)


def ended(pid: int) -> bool:
    """Whether ``pid`` ends (or is a zombie) within 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.01)
    return False


def record(image: Path) -> dict[str, int]:
    found: dict[str, int] = json.loads(guestram.holder_record(image).read_text())
    return found


def test_a_clone_gets_the_image_in_a_memfd_sealed_against_every_change(image: Path) -> None:
    ram = shared_copy(image)
    try:
        assert not ram.shared and guestram.is_sealed(ram.fd)
        assert os.pread(ram.fd, 60, PAGE) == b"kernel" * 10 and os.pread(ram.fd, 5, 200 * PAGE) == b"agent"
        assert os.fstat(ram.fd).st_size == SIZE  # the RAM alone, not the stream after it
        # not even a root process holding it read-write can change what the next clone starts from
        writable = os.open(f"/proc/self/fd/{ram.fd}", os.O_RDWR)
        try:
            for change in (lambda: os.pwrite(writable, b"x", 0), lambda: os.ftruncate(writable, 1 << 21),
                           lambda: os.ftruncate(writable, PAGE),
                           lambda: mmap.mmap(writable, PAGE, mmap.MAP_SHARED, mmap.PROT_WRITE)):
                with pytest.raises(PermissionError):
                    change()
            # what QEMU does with it: a private mapping, whose writes stay its own
            private = mmap.mmap(writable, PAGE * 2, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
            private[PAGE:PAGE + 6] = b"guest!"
            private.close()
        finally:
            os.close(writable)
        assert os.pread(ram.fd, 6, PAGE) == b"kernel"
    finally:
        os.close(ram.fd)


def test_every_clone_shares_one_memfd_through_one_holder(image: Path) -> None:
    first = shared_copy(image)
    second = shared_copy(image)
    try:
        assert os.fstat(first.fd).st_ino == os.fstat(second.fd).st_ino == record(image)["inode"]
        holder = record(image)["pid"]
        assert Path(f"/proc/{holder}/cmdline").read_bytes().split(b"\0")[1] == b"infinity"
    finally:
        os.close(first.fd)
        os.close(second.fd)
    # the holder keeps it for the next clone once every descriptor of ours is closed
    third = shared_copy(image)
    os.close(third.fd)
    assert record(image)["pid"] == holder


def test_a_dead_holder_is_replaced_and_a_replaced_image_ends_the_old_holder(image: Path) -> None:
    os.close(shared_copy(image).fd)
    old = record(image)
    os.kill(old["pid"], 9)
    assert ended(old["pid"])
    os.close(shared_copy(image).fd)
    replaced = record(image)
    assert replaced["pid"] != old["pid"] and replaced["inode"] != old["inode"]
    # a new snapshot under the same name: the holder of the old image must never serve it
    new = image.with_name("new.qemu")
    write_snapshot(new, b"fresh")
    os.replace(new, image)
    ram = shared_copy(image)
    try:
        assert os.pread(ram.fd, 5, 0) == b"fresh"
    finally:
        os.close(ram.fd)
    assert record(image)["pid"] != replaced["pid"]
    assert ended(replaced["pid"])


def test_release_ends_the_holder_and_a_bad_record_is_as_good_as_none(image: Path) -> None:
    os.close(shared_copy(image).fd)
    holder = record(image)["pid"]
    guestram.release(image)
    assert not guestram.holder_record(image).exists()
    assert ended(holder)
    guestram.holder_record(image).write_text('{"pid": "1", "fd": -3}')
    os.close(shared_copy(image).fd)
    assert record(image)["pid"] > 1


def test_a_snapshot_shorter_than_its_ram_is_a_boot_error_so_the_monitor_boots_cold(tmp_path: Path) -> None:
    short = tmp_path / "short.qemu"
    short.write_bytes(b"x" * PAGE)
    fd = os.open(short, os.O_RDONLY)
    try:
        with pytest.raises(BootError, match="guest RAM cannot be shared"):
            guestram.clone_ram(short, fd, SIZE)
    finally:
        os.close(fd)


def test_without_sharing_each_vm_gets_a_sealed_copy_of_its_own(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROPOD_SHARED_RAM", "0")
    first, second = shared_copy(image), shared_copy(image)
    try:
        assert os.fstat(first.fd).st_ino != os.fstat(second.fd).st_ino and guestram.is_sealed(first.fd)
        assert os.pread(second.fd, 5, 200 * PAGE) == b"agent"
        assert not guestram.holder_record(image).exists()
    finally:
        os.close(first.fd)
        os.close(second.fd)


def test_the_saved_image_keeps_only_the_touched_pages_and_the_stream_follows(tmp_path: Path) -> None:
    ram = guestram.template_ram(4)
    target = tmp_path / "t.qemu"
    out = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(ram.fd, b"x", 3 << 20)
        assert guestram.write_image(ram, out) == 4 << 20
        os.write(out, b"stream")  # what QEMU writes next, from where the RAM ends
    finally:
        os.close(ram.fd)
        os.close(out)
    assert target.stat().st_size == (4 << 20) + 6
    assert target.stat().st_blocks * 512 <= 64 * 1024  # a page of RAM and the stream; the rest holes
    fd = os.open(target, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 3 << 20 and os.pread(fd, 1, 3 << 20) == b"x"
        assert os.pread(fd, 6, 4 << 20) == b"stream"
    finally:
        os.close(fd)
