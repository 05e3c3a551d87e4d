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


@pytest.fixture
def image(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB RAM image with two touched pages and holes elsewhere; its holder is ended afterwards."""
    path = tmp_path / "k.ram"
    with path.open("wb") as f:
        f.truncate(1 << 20)
        f.seek(PAGE)
        f.write(b"kernel" * 10)
        f.seek(200 * PAGE)
        f.write(b"agent")
    yield path
    guestram.release(path)


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
    ram = guestram.shared_copy(image)
    try:
        assert not ram.shared and guestram.is_sealed(ram.fd)
        assert os.pread(ram.fd, 60, PAGE) == b"kernel" * 10 and os.pread(ram.fd, 5, 200 * PAGE) == b"agent"
        assert os.fstat(ram.fd).st_size == 1 << 20
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
    first = guestram.shared_copy(image)
    second = guestram.shared_copy(image)
    try:
        assert os.fstat(first.fd).st_ino == os.fstat(second.fd).st_ino == record(image)["inode"]
        holder = record(image)["pid"]
        assert Path(f"/proc/{holder}/cmdline").read_bytes().split(b"\0")[1] == b"infinity"
    finally:
        os.close(first.fd)
        os.close(second.fd)
    # the holder keeps it for the next clone once every descriptor of ours is closed
    third = guestram.shared_copy(image)
    os.close(third.fd)
    assert record(image)["pid"] == holder


def test_a_dead_holder_is_replaced_and_a_replaced_image_ends_the_old_holder(image: Path) -> None:
    os.close(guestram.shared_copy(image).fd)
    old = record(image)
    os.kill(old["pid"], 9)
    assert ended(old["pid"])
    os.close(guestram.shared_copy(image).fd)
    replaced = record(image)
    assert replaced["pid"] != old["pid"] and replaced["inode"] != old["inode"]
    # a new snapshot under the same name: the holder of the old image must never serve it
    new = image.with_name("new.ram")
    new.write_bytes(b"fresh" + b"\0" * ((1 << 20) - 5))
    os.replace(new, image)
    ram = guestram.shared_copy(image)
    try:
        assert os.pread(ram.fd, 5, 0) == b"fresh"
    finally:
        os.close(ram.fd)
    assert record(image)["pid"] != replaced["pid"]
    assert ended(replaced["pid"])


def test_release_ends_the_holder_and_a_bad_record_is_as_good_as_none(image: Path) -> None:
    os.close(guestram.shared_copy(image).fd)
    holder = record(image)["pid"]
    guestram.release(image)
    assert not guestram.holder_record(image).exists()
    assert ended(holder)
    guestram.holder_record(image).write_text('{"pid": "1", "fd": -3}')
    os.close(guestram.shared_copy(image).fd)
    assert record(image)["pid"] > 1


def test_a_missing_image_is_a_boot_error_so_the_monitor_boots_cold(tmp_path: Path) -> None:
    with pytest.raises(BootError, match="guest RAM cannot be shared"):
        guestram.shared_copy(tmp_path / "gone.ram")


def test_the_saved_image_keeps_only_the_touched_pages(tmp_path: Path) -> None:
    ram = guestram.template_ram(4)
    try:
        os.pwrite(ram.fd, b"x", 3 << 20)
        target = tmp_path / "t.ram"
        guestram.save_image(ram, target)
    finally:
        os.close(ram.fd)
    assert target.stat().st_size == 4 << 20 and target.stat().st_mode & 0o777 == 0o600
    assert target.stat().st_blocks * 512 <= 64 * 1024  # one page of data, the rest holes
    fd = os.open(target, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 3 << 20 and os.pread(fd, 1, 3 << 20) == b"x"
    finally:
        os.close(fd)

