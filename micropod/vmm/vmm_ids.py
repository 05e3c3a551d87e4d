"""A dedicated uid (and gid) for each confined VMM, from a range no user of the host has (like podman's subuid
ranges): ``MICROPOD_VMM_IDS=FIRST-LAST``, by default 1000000-1065535.

The allocation is host-wide, whatever the state root: a uid is taken by an flock on
``/run/micropod/vmm-ids/<uid>``, held by the VM's monitor for the VM's life, and a uid any process still runs as
is never taken. A monitor that dies lets go of the lock with its last descriptor, so no record goes stale; a VMM
that outlives it still runs as its uid, which no other VM gets until it has gone. The first uid tried is derived from
the VM's id, so that a VM usually keeps its uid across restarts.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

from micropod.errors import UsageError

DEFAULT_RANGE = "1000000-1065535"
LOCK_DIR = Path("/run/micropod/vmm-ids")


MIN_ID = 65536  # below: the host's own users, groups and nobody


def id_range(text: str | None = None, etc: Path = Path("/etc")) -> range:
    """The configured range, refused if anyone else may use one of its ids: a user or group of the host, or a
    subordinate id range (/etc/subuid, /etc/subgid) that a rootless container could map."""
    text = text if text is not None else os.environ.get("MICROPOD_VMM_IDS", DEFAULT_RANGE)
    first, sep, last = text.partition("-")
    if not sep or not first.isdigit() or not last.isdigit() or not MIN_ID <= int(first) <= int(last) < 2 ** 32 - 1:
        raise UsageError(f"invalid MICROPOD_VMM_IDS {text!r}: use FIRST-LAST from {MIN_ID} up, such as "
                         f"{DEFAULT_RANGE}")
    ids = range(int(first), int(last) + 1)
    for name, taken in _ids_in_use(etc):
        if taken.start < ids.stop and ids.start < taken.stop:
            raise UsageError(f"invalid MICROPOD_VMM_IDS {text!r}: it overlaps {name} "
                             f"({taken.start}-{taken.stop - 1}); choose ids nobody else has")
    return ids


def _ids_in_use(etc: Path) -> list[tuple[str, range]]:
    found: list[tuple[str, range]] = []
    for name in ("passwd", "group"):
        for line in _lines(etc / name):
            fields = line.split(":")
            if len(fields) > 2 and fields[2].isdigit():
                found.append((f"{fields[0]} in /etc/{name}", range(int(fields[2]), int(fields[2]) + 1)))
    for name in ("subuid", "subgid"):
        for line in _lines(etc / name):
            fields = line.split(":")
            if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                found.append((f"{fields[0]}'s range in /etc/{name}",
                              range(int(fields[1]), int(fields[1]) + int(fields[2]))))
    return found


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def _live_uids() -> set[int]:
    """Every uid a process runs as now: a VMM whose monitor died may still run as its VM's, and its uid is not
    given to another VM meanwhile."""
    uids: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                uids.update(int(line.split()[1]) for line in status if line.startswith("Uid:"))
        except (OSError, ValueError, IndexError):
            continue
    return uids


class VmmId:
    """One VM's uid, held while this object's lock is."""

    def __init__(self, uid: int, fd: int) -> None:
        self.uid, self._fd = uid, fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def allocate(vm_id: str, ids: range | None = None, lock_dir: Path = LOCK_DIR) -> VmmId:
    ids = ids if ids is not None else id_range()
    lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if lock_dir.is_symlink() or lock_dir.stat().st_uid != os.geteuid():
        raise UsageError(f"{lock_dir} is not micropod's own directory: its VMM ids cannot be allocated")
    start = int.from_bytes(hashlib.sha256(vm_id.encode()).digest()[:8], "big") % len(ids)
    running = _live_uids()
    for offset in range(len(ids)):
        uid = ids[(start + offset) % len(ids)]
        if uid in running:
            continue
        fd = os.open(lock_dir / str(uid), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return VmmId(uid, fd)
    raise UsageError(f"no uid is free for another VMM in MICROPOD_VMM_IDS={ids.start}-{ids.stop - 1}: all "
                     f"{len(ids)} run confined VMs; widen the range")
