"""Where micropod-runtime keeps its containers: ``<root>/<id>/state.json`` and the exec fifo, as runc does.

The directory is the container's existence: ``create`` makes it (failing if it exists, which is how duplicate
ids are refused) and ``delete`` removes it. Its status is never stored but derived, as runc derives it: the
init process gone means stopped; the exec fifo still there means created; a frozen cgroup means paused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from micropod.errors import ContainerStateError, OciRuntimeError

OCI_VERSION = "1.2.0"
DEFAULT_ROOT = Path("/run/micropod-runtime")
STATE_FILE = "state.json"
EXEC_FIFO = "exec.fifo"
_CONTAINER_ID = re.compile(r"[\w+,.-]+", re.ASCII)


def validate_id(cid: str) -> None:
    """Refuse a container id as runc does, before it is joined to any path."""
    if not cid:
        raise OciRuntimeError("container id cannot be empty")
    if cid in (".", "..") or not _CONTAINER_ID.fullmatch(cid):
        raise OciRuntimeError("invalid container ID format")
    if len(cid) > 255:
        raise OciRuntimeError("invalid container ID format: longer than 255 characters")


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat): a pid alone may be reused."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):  # a zombie has exited: what runc calls stopped
        return None
    return int(fields[19])


class Container:
    """What state.json holds: the runtime-spec state, and what we need to find the container again. (A plain
    class: importing dataclasses costs every command of the runtime about 10 ms.)"""

    FIELDS = ("id", "bundle", "pid", "pid_start", "created", "annotations", "cgroup_paths", "rootfs",
              "namespaces", "owner", "hooks")

    def __init__(self, id: str, bundle: str, pid: int, pid_start: int, created: str,
                 annotations: dict[str, str] | None = None, cgroup_paths: dict[str, str] | None = None,
                 rootfs: str = "", namespaces: dict[str, str] | None = None, owner: str = "",
                 hooks: dict[str, Any] | None = None) -> None:
        self.id, self.bundle, self.pid, self.pid_start, self.created = id, bundle, pid, pid_start, created
        self.annotations = annotations or {}
        self.cgroup_paths = cgroup_paths or {}  # Cgroup.paths(), to find it again
        self.rootfs = rootfs
        self.namespaces = namespaces or {}  # type -> the path joined, "" for one created
        self.owner = owner
        self.hooks = hooks or {}  # config.json's, for start and delete

    def init_alive(self) -> bool:
        return self.pid > 0 and start_time(self.pid) == self.pid_start

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Container:
        for name, kind in (("id", str), ("bundle", str), ("pid", int), ("pid_start", int), ("created", str),
                           ("annotations", dict), ("cgroup_paths", dict), ("namespaces", dict), ("hooks", dict)):
            if name in data and not isinstance(data[name], kind):
                raise TypeError(f"{name} is not a {kind.__name__}")
        return cls(**{name: data[name] for name in cls.FIELDS if name in data})


MAX_STATE = 1 << 20


class StateDir:
    """``--root``: one directory per container, private to root. A root another user could write to would let
    them plant a state file naming any pid to kill or join, or hooks to run: it is refused."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._checked = False

    def _check_root(self) -> None:
        if self._checked:
            return
        try:
            st = os.lstat(self.root)
        except FileNotFoundError:
            return
        import stat

        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise OciRuntimeError(f"--root {self.root}: must be a directory owned by uid {os.geteuid()} that no"
                                  " one else can write to (not a symlink)")
        self._checked = True

    def path(self, cid: str) -> Path:
        validate_id(cid)
        self._check_root()
        return self.root / cid

    def reserve(self, cid: str) -> Path:
        """The new container's directory; ContainerStateError if the id is taken."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self._checked = False
        path = self.path(cid)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            raise ContainerStateError(f"container with id exists: {cid}") from None
        return path

    def save(self, container: Container) -> None:
        path = self.path(container.id)
        tmp = path / f".{STATE_FILE}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(container.to_json()).encode())  # dumps has the C encoder; dump does not
        os.replace(tmp, path / STATE_FILE)

    def load(self, cid: str) -> Container:
        path = self.path(cid) / STATE_FILE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ContainerStateError(f"container does not exist: {cid}") from None
        try:
            data = json.loads(os.read(fd, MAX_STATE + 1)[:MAX_STATE])
            return Container.from_json(data)
        except (ValueError, TypeError) as exc:
            raise OciRuntimeError(f"container {cid}: corrupt state: {exc}") from None
        finally:
            os.close(fd)

    def ids(self) -> list[str]:
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        return [name for name in names if (self.root / name / STATE_FILE).exists()]

    def remove(self, cid: str) -> None:
        path = self.path(cid)
        for name in (STATE_FILE, EXEC_FIFO, f".{STATE_FILE}.tmp"):
            with contextlib.suppress(FileNotFoundError):
                (path / name).unlink()
        with contextlib.suppress(FileNotFoundError):
            path.rmdir()

    @contextlib.contextmanager
    def locked(self, cid: str) -> Iterator[None]:
        """One command at a time per container (start racing delete, two kills racing a delete)."""
        try:
            fd = os.open(self.path(cid), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ContainerStateError(f"container does not exist: {cid}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def status(state_dir: StateDir, container: Container, frozen: bool = False) -> str:
    if not container.init_alive():
        return "stopped"
    if (state_dir.path(container.id) / EXEC_FIFO).exists():
        return "created"
    return "paused" if frozen else "running"


def spec_state(container: Container, current: str) -> dict[str, Any]:
    """The runtime-spec state document, with runc's extra fields."""
    state: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "id": container.id,
        "pid": container.pid if current != "stopped" else 0,
        "status": current,
        "bundle": container.bundle,
        "rootfs": container.rootfs,
        "created": container.created,
        "owner": container.owner,
    }
    if container.annotations:
        state["annotations"] = container.annotations
    return state
