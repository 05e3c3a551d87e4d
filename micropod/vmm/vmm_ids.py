"""A dedicated uid (and gid) for each confined VMM, from a range no user of the host has (like podman's subuid
ranges): ``MICROPOD_VMM_IDS=FIRST-LAST``, by default 1000000-1065535.

The allocation is host-wide, whatever the state root: a uid is taken by an flock on
``/run/micropod/vmm-ids/<uid>``, held by the VM's monitor for the VM's life. A monitor that dies lets go of it
with its last descriptor, so no record can go stale. The first uid tried is derived from the VM's id, so that a
VM usually keeps its uid across restarts.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

from micropod.errors import UsageError

DEFAULT_RANGE = "1000000-1065535"
LOCK_DIR = Path("/run/micropod/vmm-ids")


def id_range(text: str | None = None) -> range:
    text = text if text is not None else os.environ.get("MICROPOD_VMM_IDS", DEFAULT_RANGE)
    first, sep, last = text.partition("-")
    if not sep or not first.isdigit() or not last.isdigit() or not 0 < int(first) <= int(last) < 2 ** 32 - 1:
        raise UsageError(f"invalid MICROPOD_VMM_IDS {text!r}: use FIRST-LAST, such as {DEFAULT_RANGE}")
    return range(int(first), int(last) + 1)


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
    start = int.from_bytes(hashlib.sha256(vm_id.encode()).digest()[:8], "big") % len(ids)
    for offset in range(len(ids)):
        uid = ids[(start + offset) % len(ids)]
        fd = os.open(lock_dir / str(uid), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return VmmId(uid, fd)
    raise UsageError(f"no uid is free for another VMM in MICROPOD_VMM_IDS={ids.start}-{ids.stop - 1}: all "
                     f"{len(ids)} run confined VMs; widen the range")
