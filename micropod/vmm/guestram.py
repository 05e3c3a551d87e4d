"""Guest RAM shared by every VM restored from one boot snapshot, as Kata's VM templating does.

The template VM runs on a memfd mapped shared (``memory-backend-file,share=on``), so its RAM is that file, and
its migration stream leaves RAM out (``x-ignore-shared``). The file is kept beside the stream. A VM restored
from the snapshot maps one common copy privately (``share=off``): the pages it only reads stay the page cache's,
one copy for every clone, and the ones it writes become its own. The restore copies no RAM at all.

That common copy is a memfd sealed against every change (write, shrink, grow, more seals), so not even a root
QEMU that a guest took over can alter the memory the next clone starts from: QEMU 7.2 opens a memory file
read-write whatever its sharing (8.2 added ``rom=off``), and a writable file on disk would be exactly that hole.
The memfd outlives any one VM in a holder, a ``sleep`` that inherits it, recorded beside the image (pid, start
time, descriptor, inode). A monitor reopens it through ``/proc/PID/fd/N``; a holder that is gone is started
again from the image, and one whose record names another image is ended.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import stat
from dataclasses import dataclass
from pathlib import Path

from micropod import proc
from micropod.errors import BootError, MicropodError
from micropod.fsutil import PRIVATE_FILE, atomic_write, flock, fsync_dir
from micropod.jsonfile import read_json_object
from micropod.liveness import start_time

BACKEND_ID = "ram"
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
_COPY_CHUNK = 1 << 24
_RECORD_MAX = 4096


@dataclass(frozen=True)
class GuestRam:
    """The descriptor of a VM's RAM file, and whether QEMU maps it shared (the template) or privately."""

    fd: int
    shared: bool

    def argv(self, memory_mib: int) -> list[str]:
        """QEMU's memory backend over this descriptor (``-machine memory-backend=`` names it)."""
        return ["-object", f"memory-backend-file,id={BACKEND_ID},size={memory_mib}M,"
                           f"mem-path=/proc/self/fd/{self.fd},share={'on' if self.shared else 'off'}"]


# The migration capability that leaves shared RAM out of the stream, on both of its ends: QEMU 7.2 has no
# command-line property for it, so it is set over QMP before `migrate` and before `migrate-incoming`.
IGNORE_SHARED = [{"capability": "x-ignore-shared", "state": True}]


def template_ram(memory_mib: int) -> GuestRam:
    """A new, empty memfd for a template VM to run on."""
    fd = os.memfd_create("micropod-template-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, memory_mib << 20)
    except BaseException:
        os.close(fd)
        raise
    return GuestRam(fd, shared=True)


def save_image(ram: GuestRam, target: Path) -> None:
    """The template's RAM, written sparse (only the pages the guest touched) and durably to ``target``."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        _copy_sparse(ram.fd, out, os.fstat(ram.fd).st_size)
        os.fsync(out)
        os.replace(tmp, target)
    finally:
        os.close(out)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(target.parent)


def _copy_sparse(src: int, dst: int, size: int) -> None:
    os.ftruncate(dst, size)
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
                return
            raise
        end = os.lseek(src, start, os.SEEK_HOLE)
        os.lseek(dst, start, os.SEEK_SET)
        while start < end:
            sent = os.sendfile(dst, src, start, min(end - start, _COPY_CHUNK))
            if sent == 0:
                raise OSError(errno.EIO, "the RAM file ended early")
            start += sent
        offset = end


def shared_copy(image: Path) -> GuestRam:
    """The sealed memfd that holds ``image`` for every VM restored from it: the running holder's, or a new one
    (loaded from the image, sealed, and given to a new holder)."""
    record = holder_record(image)
    try:
        with flock(image.with_name(f".{image.name}.lock")):
            fd = _from_holder(record, image)
            if fd is None:
                fd = _load_sealed(image)
                try:
                    _start_holder(fd, record, image)
                except BaseException:
                    os.close(fd)
                    raise
    except OSError as exc:
        # A BootError: the monitor then drops the snapshot and boots cold.
        raise BootError(f"the snapshot's guest RAM cannot be shared: {exc.strerror or exc}") from exc
    return GuestRam(fd, shared=False)


def holder_record(image: Path) -> Path:
    return image.with_name(f"{image.name}.holder")


def _identity(image: Path) -> str:
    st = image.stat()
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _from_holder(record: Path, image: Path) -> int | None:
    found = _read_record(record)
    if found is None:
        return None
    pid, started, fd_number, inode, of_image = found
    if of_image != _identity(image):  # the holder of an image since replaced
        _end(pid, started)
        return None
    if start_time(pid) != started:
        return None
    try:
        fd = os.open(f"/proc/{pid}/fd/{fd_number}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    info = os.fstat(fd)
    if info.st_ino != inode or info.st_size != image.stat().st_size or not is_sealed(fd):
        os.close(fd)
        return None
    return fd


def _read_record(record: Path) -> tuple[int, int, int, int, str] | None:
    try:
        found = read_json_object(record, _RECORD_MAX, "a guest RAM holder's record", BootError, missing_ok=True)
    except MicropodError:
        return None  # unreadable: as good as none, a new holder replaces it
    if found is None:
        return None
    values = (found.get("pid"), found.get("started"), found.get("fd"), found.get("inode"))
    image = found.get("image")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values) or \
            not isinstance(image, str):
        return None
    pid, started, fd_number, inode = (int(v) for v in values)  # type: ignore[arg-type]
    return pid, started, fd_number, inode, image


def is_sealed(fd: int) -> bool:
    return fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS


def _load_sealed(image: Path) -> int:
    src = os.open(image, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    fd = os.memfd_create(f"micropod-ram-{image.stem[:16]}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        info = os.fstat(src)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"{image} is not a regular file")
        _copy_sparse(src, fd, info.st_size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    finally:
        os.close(src)
    return fd


def _start_holder(fd: int, record: Path, image: Path) -> None:
    sleep = shutil.which("sleep") or "/bin/sleep"
    holder = proc.spawn([sleep, "infinity"], pass_fds=(fd,), new_session=True)
    started = start_time(holder.pid)
    if started is None:
        raise OSError(errno.ESRCH, "the guest RAM holder ended at once")
    entry = {"pid": holder.pid, "started": started, "fd": fd, "inode": os.fstat(fd).st_ino,
             "image": _identity(image)}
    atomic_write(record, json.dumps(entry).encode(), mode=PRIVATE_FILE)


def holder_alive(image: Path) -> bool:
    found = _read_record(holder_record(image))
    return found is not None and start_time(found[0]) == found[1]


def release(image: Path) -> None:
    """End the holder of ``image`` (the snapshot is being dropped); VMs running on its memfd keep it mapped."""
    record = holder_record(image)
    found = _read_record(record)
    if found is not None:
        _end(found[0], found[1])
    record.unlink(missing_ok=True)


def _end(pid: int, started: int) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return  # gone already
    try:
        if start_time(pid) == started:  # checked after the pidfd is held, so the pid cannot be another's by now
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


def image_for(snapshot: Path) -> Path:
    """Where a boot snapshot's guest RAM is kept: beside its migration stream."""
    return snapshot.with_suffix(".ram")
