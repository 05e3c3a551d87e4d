"""Guest RAM shared by every VM restored from one boot snapshot, as Kata's VM templating does.

The template VM runs on a memfd mapped shared (``memory-backend-file,share=on``), so its RAM is that file, and
its migration stream leaves RAM out (``x-ignore-shared``). A VM restored from the snapshot maps one common copy
privately (``share=off``): the pages it only reads stay the page cache's, one copy for every clone, and the
ones it writes become its own. The restore copies no RAM at all.

That common copy is a memfd sealed against every change (write, shrink, grow, more seals), so not even a root
QEMU that a guest took over can alter the memory the next clone starts from: QEMU 7.2 opens a memory file
read-write whatever its sharing (8.2 added ``rom=off``), and a writable file on disk would be exactly that hole.
The memfd outlives any one VM in a holder, a ``sleep`` that inherits it, recorded beside the snapshot (pid,
start time, descriptor, inode, and the snapshot file's identity). A monitor reopens it through
``/proc/PID/fd/N``; a holder that is gone is started again from the snapshot, and one whose record names
another snapshot file (or fails any check) is ended. The RAM is the snapshot file's first bytes, the migration
stream follows: one file, one rename, so a stream is never restored over another template's RAM.
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
from micropod.fsutil import PRIVATE_FILE, atomic_write, copy_sparse, flock
from micropod.jsonfile import read_json_object
from micropod.liveness import start_time
from micropod.paths import switched_on

BACKEND_ID = "ram"
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
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


def write_image(ram: GuestRam, out: int) -> int:
    """The template's RAM into ``out`` from offset 0, sparse (only the pages the guest touched); ``out`` is left
    at its end, where the migration stream follows in the same file (snapshot.py). Returns its size."""
    size = os.fstat(ram.fd).st_size
    copy_sparse(ram.fd, out, size)
    os.lseek(out, size, os.SEEK_SET)
    return size


def sharing_enabled() -> bool:
    """MICROPOD_SHARED_RAM=0: every VM gets a copy of its own (no page is shared between tenants' VMs, at the
    cost of the memory and a copy per start)."""
    return switched_on("MICROPOD_SHARED_RAM")


def clone_ram(snapshot: Path, fd: int, size: int) -> GuestRam:
    """The RAM a VM restored from ``snapshot`` (open as ``fd``, its first ``size`` bytes) runs on: the sealed
    memfd every such VM shares, from its running holder or from a new one; its own copy without sharing."""
    try:
        if not sharing_enabled():
            return GuestRam(_load_sealed(fd, size, snapshot.stem), shared=False)
        with flock(lock_of(snapshot)):
            record = holder_record(snapshot)
            identity = _identity(fd)
            memfd = _from_holder(record, identity, size)
            if memfd is None:
                memfd = _load_sealed(fd, size, snapshot.stem)
                try:
                    _start_holder(memfd, record, identity)
                except BaseException:
                    os.close(memfd)
                    raise
    except OSError as exc:
        # A BootError: the monitor then drops the snapshot and boots cold.
        raise BootError(f"the snapshot's guest RAM cannot be shared: {exc.strerror or exc}") from exc
    return GuestRam(memfd, shared=False)


def lock_of(snapshot: Path) -> Path:
    """The lock a snapshot is built, shared and dropped under."""
    return snapshot.with_name(f".{snapshot.name}.lock")


def holder_record(snapshot: Path) -> Path:
    return snapshot.with_suffix(".holder")


def _identity(fd: int) -> str:
    """The snapshot file itself, by its open descriptor: a holder serves the file it was loaded from, never one
    saved since under the same name."""
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _from_holder(record: Path, identity: str, size: int) -> int | None:
    found = _read_record(record)
    if found is None:
        return None
    pid, started, fd_number, inode, of_snapshot = found
    if of_snapshot != identity or start_time(pid) != started:
        _end(pid, started)  # the holder of a snapshot since replaced (or gone): never used again
        return None
    try:
        fd = os.open(f"/proc/{pid}/fd/{fd_number}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        _end(pid, started)
        return None
    info = os.fstat(fd)
    # checked again once open, so that the pid cannot have become another process's in between
    if start_time(pid) != started or info.st_ino != inode or info.st_size != size or not is_sealed(fd):
        os.close(fd)
        _end(pid, started)
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
    identity = found.get("snapshot")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values) or \
            not isinstance(identity, str):
        return None
    pid, started, fd_number, inode = (int(v) for v in values)  # type: ignore[arg-type]
    return pid, started, fd_number, inode, identity


def is_sealed(fd: int) -> bool:
    return fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS


def _load_sealed(src: int, size: int, name: str) -> int:
    info = os.fstat(src)
    if not stat.S_ISREG(info.st_mode) or info.st_size <= size:
        raise OSError(errno.EINVAL, "the snapshot is shorter than its guest RAM")
    fd = os.memfd_create(f"micropod-ram-{name[:16]}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        copy_sparse(src, fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _start_holder(fd: int, record: Path, identity: str) -> None:
    sleep = shutil.which("sleep") or "/bin/sleep"
    holder = proc.spawn([sleep, "infinity"], pass_fds=(fd,), new_session=True, cwd=Path("/"))
    started = start_time(holder.pid)
    try:
        if started is None:
            raise OSError(errno.ESRCH, "the guest RAM holder ended at once")
        entry = {"pid": holder.pid, "started": started, "fd": fd, "inode": os.fstat(fd).st_ino,
                 "snapshot": identity}
        atomic_write(record, json.dumps(entry).encode(), mode=PRIVATE_FILE)
    except BaseException:
        holder.kill()  # a holder nobody can find would keep the RAM forever
        raise


def holder_alive(snapshot: Path) -> bool:
    found = _read_record(holder_record(snapshot))
    return found is not None and start_time(found[0]) == found[1]


def release(snapshot: Path) -> None:
    """End the holder of ``snapshot`` (being dropped, under its lock); VMs running on its RAM keep it mapped."""
    record = holder_record(snapshot)
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
