"""cgroups for micropod-runtime: the ``Cgroup`` interface, which version applies, where a container's cgroup
lives, and what the v1 and v2 managers share (file access, validation, conversions, kill and remove).

Where (runc 1.1's cgroupfs driver; there is no systemd driver):
- an absolute ``linux.cgroupsPath`` is taken from each hierarchy's root: ``/a/b`` is ``<mount>/a/b``;
- a relative one from the runtime's own cgroup (``/proc/self/cgroup``): on v1 in each hierarchy, on v2
  from the parent of our own cgroup (ours has processes, so it could not delegate controllers);
- absent, it is the container id, relative as above.

Every file is opened with O_NOFOLLOW and written whole in one write(2), as cgroupfs expects.
Standard library only: this runs in guests as ``python3 -I -S``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal as signals
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

from micropod import syscalls
from micropod.errors import CgroupError, SpecError

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_SUPER_MAGIC = 0x27E0EB
CGROUP2_SUPER_MAGIC = 0x63677270
FREEZE_TIMEOUT = 10.0  # runc gives a freeze as long before it thaws and fails
REMOVE_TIMEOUT = 5.0  # for the last tasks to leave before rmdir stops failing with EBUSY
V1_CONTROLLERS = frozenset({"cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids",
                            "hugetlb", "net_cls", "net_prio", "perf_event", "rdma", "misc"})
UNLIMITED = (1 << 64) - 1  # what runc reports for "max"

FreezerState = Literal["frozen", "running"]


class Cgroup(Protocol):
    """One container's cgroup, in every hierarchy that applies. The objects do no I/O when built.

    Order for a new container: ``validate``, ``create``, ``apply`` (which validates again), then ``add``.
    ``apply`` leaves devices alone unless ``devices`` is given: pass ``container_device_rules(...)``
    (micropod.runtime.cgroups_devices) to get runc's deny-by-default list with its defaults."""

    def paths(self) -> dict[str, str]:
        """Controller name to the cgroup's directory, or {"": directory} on v2. Save it in the container's
        state and find the cgroup again with ``cgroup_from_paths``: a relative path depends on who asks."""
        ...

    def validate(self, resources: Mapping[str, Any], field: str = "linux.resources") -> None: ...
    def create(self) -> None: ...
    def apply(self, resources: Mapping[str, Any]) -> None: ...
    def add(self, pid: int) -> None: ...
    def pids(self) -> list[int]: ...
    def freeze(self) -> None: ...
    def thaw(self) -> None: ...
    def state(self) -> FreezerState: ...
    def stats(self) -> dict[str, Any]: ...
    def kill_all(self, signal: int) -> None: ...
    def destroy(self) -> None: ...
    def exists(self) -> bool: ...


def open_cgroup(cgroups_path: str | None, container_id: str, root: Path = CGROUP_ROOT) -> Cgroup:
    """The cgroup for a container: v2 when ``root`` is a cgroup2 mount, else v1 (one hierarchy per
    controller mounted under ``root``; ``name=`` hierarchies such as systemd's are left alone)."""
    inner = inner_path(cgroups_path, container_id)
    own = None if inner.startswith("/") else own_cgroups(_read_text(Path("/proc/self/cgroup")))
    if is_cgroup2(root):
        from micropod.runtime.cgroups_v2 import V2Cgroup

        return V2Cgroup(root, v2_path(root, inner, own))
    from micropod.runtime.cgroups_v1 import V1Cgroup

    return V1Cgroup(v1_paths(root, inner, _read_text(Path("/proc/self/mountinfo")), own))


def cgroup_from_paths(paths: Mapping[str, str], root: Path = CGROUP_ROOT) -> Cgroup:
    """The cgroup again, from what ``paths()`` returned; each must be a directory below ``root``."""
    found = {}
    for name, path in paths.items():
        directory = Path(path)
        if not directory.is_absolute() or ".." in directory.parts or root not in directory.parents:
            raise CgroupError(f"saved cgroup path {path!r} is not a cgroup below {root}")
        found[name] = directory
    if set(found) == {""}:
        from micropod.runtime.cgroups_v2 import V2Cgroup

        return V2Cgroup(root, found[""])
    from micropod.runtime.cgroups_v1 import V1Cgroup

    return V1Cgroup(found)


def is_cgroup2(root: Path) -> bool:
    try:
        return syscalls.filesystem_magic(str(root)) == CGROUP2_SUPER_MAGIC
    except OSError as exc:
        raise CgroupError(f"cannot inspect the cgroup root {root}: {exc.strerror or exc}") from exc


def inner_path(cgroups_path: object, container_id: str) -> str:
    """``linux.cgroupsPath`` cleaned (``.`` and repeated slashes dropped), or the container id if absent."""
    if cgroups_path is None or cgroups_path == "":
        if not container_id or "/" in container_id or "\0" in container_id or container_id in (".", ".."):
            raise SpecError("id", f"{container_id!r} cannot name a cgroup")
        return container_id
    if not isinstance(cgroups_path, str):
        raise SpecError("linux.cgroupsPath", "must be a string")
    if "\0" in cgroups_path:
        raise SpecError("linux.cgroupsPath", "must not contain NUL")
    parts = [part for part in cgroups_path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise SpecError("linux.cgroupsPath", f"{cgroups_path!r} must not contain '..'")
    if not parts:
        raise SpecError("linux.cgroupsPath", f"{cgroups_path!r} must name a cgroup below the root")
    if any(len(os.fsencode(part)) > 255 for part in parts):
        raise SpecError("linux.cgroupsPath", "a component is longer than 255 bytes")
    return ("/" if cgroups_path.startswith("/") else "") + "/".join(parts)


def own_cgroups(text: str) -> dict[str, str]:
    """/proc/self/cgroup as controller name -> path; the cgroup2 line is "" and named ones are "name=X"."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) == 3:
            for name in fields[1].split(",") if fields[1] else [""]:
                found[name] = fields[2]
    return found


def validate_resources(resources: object, field: str = "linux.resources") -> None:
    """``linux.resources`` checked field by field (micropod.runtime.cgroups_spec; imported only when needed,
    since commands such as ``state`` and ``kill`` never validate)."""
    from micropod.runtime.cgroups_spec import validate_resources as check

    check(resources, field)


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), text)


def v1_paths(root: Path, inner: str, mountinfo: str, own: Mapping[str, str] | None) -> dict[str, Path]:
    """Each controller's directory (co-mounted ones share one), and each named hierarchy's (``name=systemd``).
    Only mounts directly under ``root`` count."""
    paths: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()
        mountpoint, mount_root = Path(_unescape(fields[4])), _unescape(fields[3])
        if mountpoint.parent != root or not after or after[0] not in ("cgroup", "cgroup2"):
            continue
        options = set(after[-1].split(","))
        # Named hierarchies (systemd's) and a hybrid host's cgroup2 one ("") are joined too, as runc joins
        # them: they hold no limits, but /proc/PID/cgroup shows the container's place in each.
        names = [""] if after[0] == "cgroup2" else (
            sorted(V1_CONTROLLERS & options) + sorted(o for o in options if o.startswith("name=")))
        for name in names:
            if inner.startswith("/"):
                paths[name] = mountpoint / inner.lstrip("/")
                continue
            own_path = (own or {}).get(name)
            if own_path is None:
                raise CgroupError(f"/proc/self/cgroup has no line for the {name} hierarchy")
            if mount_root != "/" and (own_path + "/").startswith(mount_root + "/"):
                own_path = own_path[len(mount_root):]
            paths[name] = mountpoint / own_path.lstrip("/") / inner
    if "devices" not in paths:
        # As runc: without the devices controller a container could open any device node.
        raise CgroupError(f"no devices cgroup hierarchy is mounted under {root}")
    return paths


def v2_path(root: Path, inner: str, own: Mapping[str, str] | None) -> Path:
    if inner.startswith("/"):
        return root / inner.lstrip("/")
    own_path = (own or {}).get("")
    if own_path is None:
        raise CgroupError("/proc/self/cgroup has no cgroup2 line")
    return root / os.path.dirname(own_path).lstrip("/") / inner


# File access. Callers that must tell one errno from another use write_raw.
def write_raw(directory: Path, name: str, value: str) -> None:
    data = value.encode()
    fd = os.open(directory / name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(errno.EIO, "short write")
    finally:
        os.close(fd)


def write_value(directory: Path, name: str, value: str) -> None:
    try:
        write_raw(directory, name, value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {directory / name}: {exc.strerror or exc}") from exc


def _read_text(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")
    finally:
        os.close(fd)


def read_optional(directory: Path, name: str) -> str | None:
    """The file's text, or None where the kernel or controller does not provide it."""
    try:
        return _read_text(directory / name)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENOTSUP):
            return None
        raise CgroupError(f"cannot read {directory / name}: {exc.strerror or exc}") from exc


def read_value(directory: Path, name: str) -> str:
    text = read_optional(directory, name)
    if text is None:
        raise CgroupError(f"{directory / name} does not exist")
    return text.strip()


def read_number(directory: Path, name: str) -> int:
    """A single number; "max" is UNLIMITED and a missing file 0, as runc reports them."""
    text = (read_optional(directory, name) or "0").strip()
    if text == "max":
        return UNLIMITED
    try:
        return int(text.split()[0]) if text else 0
    except ValueError:
        raise CgroupError(f"{directory / name}: {text!r} is not a number") from None


def read_key_values(directory: Path, name: str) -> dict[str, int]:
    """A flat keyed file (memory.stat, cpu.stat, cgroup.events) as name -> number."""
    found: dict[str, int] = {}
    for line in (read_optional(directory, name) or "").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("-").isdigit():
            found[fields[0]] = int(fields[1])
    return found


def omit_zero(values: dict[str, Any], keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Go's omitempty, for runc's stats format: drop zero or empty ``keys`` (all keys when None)."""
    return {key: value for key, value in values.items()
            if not ((keys is None or key in keys) and value in (0, [], {}, ""))}


def make_cgroup_dir(path: Path) -> None:
    """mkdir -p, then make sure what is there is a directory on a cgroup filesystem."""
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
        magic = syscalls.filesystem_magic(str(path))
    except OSError as exc:
        raise CgroupError(f"cannot create the cgroup {path}: {exc.strerror or exc}") from exc
    if magic not in (CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC):
        raise CgroupError(f"{path} is not on a cgroup filesystem")


def add_process(directory: Path, pid: int) -> None:
    # EINVAL may mean the task is still being forked (TASK_NEW); runc tries again a few times.
    for attempt in range(5):
        try:
            write_raw(directory, "cgroup.procs", str(pid))
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL or attempt == 4:
                raise CgroupError(f"cannot add process {pid} to {directory}: {exc.strerror or exc}") from exc
            time.sleep(0.03)


def cgroup_pids(directory: Path) -> list[int]:
    """The processes of ``directory`` and of the cgroups below it (a container may make its own)."""
    found: set[int] = set()
    for current, _dirs, _files in os.walk(directory):
        found.update(int(pid) for pid in (read_optional(Path(current), "cgroup.procs") or "").split())
    return sorted(found)


def remove_cgroup_dir(directory: Path) -> None:
    """rmdir the cgroup and any below it, retrying while the last tasks exit; nothing there is fine."""
    deadline = time.monotonic() + REMOVE_TIMEOUT
    delay = 0.001
    while True:
        try:
            for current, _dirs, _files in os.walk(directory, topdown=False):
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(current)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CgroupError(f"cannot remove the cgroup {directory}: {exc.strerror or exc}") from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def signal_all(cgroup: Cgroup, signal: int) -> None:
    """Signal every process, frozen meanwhile so that none forks past us (runc's signalAllProcesses).
    A paused cgroup stays paused, except that SIGKILL thaws it so the processes can die."""
    was_frozen = cgroup.state() == "frozen"
    froze = False
    if not was_frozen:
        with contextlib.suppress(CgroupError):  # no freezer: signal anyway
            cgroup.freeze()
            froze = True
    try:
        for pid in cgroup.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal)
    finally:
        if froze or (was_frozen and signal == signals.SIGKILL):
            cgroup.thaw()


# runc's conversions from the v1 numbers of the spec to cgroup v2 files.
def cpu_weight_from_shares(shares: int) -> int:
    """cpu.shares [2, 262144] to cpu.weight [1, 10000]; 0 means unset."""
    return 0 if shares == 0 else 1 + ((shares - 2) * 9999) // 262142


def io_weight_from_blkio(weight: int) -> int:
    """blkio.weight [10, 1000] to io.weight [1, 10000]; 0 means unset."""
    return 0 if weight == 0 else 1 + ((weight - 10) * 9999) // 990


def v2_limit(value: int) -> str | None:
    """A v1-style limit for memory.max and friends: 0 is unset, -1 is "max"."""
    return None if value == 0 else "max" if value == -1 else str(value)


def v2_swap(swap: int, limit: int, field: str = "linux.resources.memory.swap") -> int:
    """The spec's swap is memory+swap (v1's memsw); memory.swap.max is the swap alone."""
    if limit == -1 and swap == 0:
        return -1  # unlimited memory, swap not given: both unlimited, as on v1
    if swap in (-1, 0):
        return swap
    if limit in (0, -1):
        raise SpecError(field, "a swap limit needs a memory limit")
    if swap < limit:
        raise SpecError(field, f"{swap} is below memory.limit {limit}; it counts memory plus swap")
    return swap - limit


__all__ = ["Cgroup", "cgroup_from_paths", "open_cgroup", "validate_resources"]
