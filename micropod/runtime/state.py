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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from micropod.errors import ContainerStateError, OciRuntimeError
from micropod.runtime.spec import validate_id

OCI_VERSION = "1.2.0"
DEFAULT_ROOT = Path("/run/micropod-runtime")
STATE_FILE = "state.json"
EXEC_FIFO = "exec.fifo"


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


@dataclass
class Container:
    """What state.json holds: the runtime-spec state, and what we need to find the container again."""

    id: str
    bundle: str
    pid: int
    pid_start: int
    created: str
    annotations: dict[str, str] = field(default_factory=dict)
    cgroup_paths: dict[str, str] = field(default_factory=dict)  # Cgroup.paths(), to find it again
    rootfs: str = ""
    namespaces: dict[str, str] = field(default_factory=dict)  # type -> /proc/PID/ns path joined at exec
    owner: str = ""

    def init_alive(self) -> bool:
        return self.pid > 0 and start_time(self.pid) == self.pid_start

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Container:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


class StateDir:
    """``--root``: one directory per container, private to root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, cid: str) -> Path:
        validate_id(cid)
        return self.root / cid

    def reserve(self, cid: str) -> Path:
        """The new container's directory; ContainerStateError if the id is taken."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
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
        with os.fdopen(fd, "w") as f:
            json.dump(container.to_json(), f)
        os.replace(tmp, path / STATE_FILE)

    def load(self, cid: str) -> Container:
        path = self.path(cid) / STATE_FILE
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise ContainerStateError(f"container does not exist: {cid}") from None
        except ValueError as exc:
            raise OciRuntimeError(f"container {cid}: corrupt state: {exc}") from None
        return Container.from_json(data)

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
