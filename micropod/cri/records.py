"""What the CRI knows of a sandbox or container beyond micropod's own records: kubelet's metadata, annotations,
log paths, the runtime handler. One versioned JSON record (``cri.json``) in the pod's or the container's directory,
written atomically, so a restarted server finds it again."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from micropod.fsutil import PRIVATE_FILE, atomic_write
from micropod.state import records

SANDBOX_RECORD = records.RecordKind("CRI sandbox record", upgrades=())
CONTAINER_RECORD = records.RecordKind("CRI container record", upgrades=())
FILE_NAME = "cri.json"


@dataclass(frozen=True)
class SandboxInfo:
    name: str
    uid: str
    namespace: str
    attempt: int
    annotations: dict[str, str] = field(default_factory=dict)
    log_directory: str = ""
    runtime_handler: str = ""
    cgroup_parent: str = ""
    sysctls: dict[str, str] = field(default_factory=dict)
    port_mappings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def reserved_name(self) -> str:
        """containerd's sandbox name: one sandbox per pod, namespace, uid and attempt."""
        return f"{self.name}_{self.namespace}_{self.uid}_{self.attempt}"


@dataclass(frozen=True)
class ContainerInfo:
    name: str
    attempt: int
    sandbox_id: str
    image: str
    annotations: dict[str, str] = field(default_factory=dict)
    log_path: str = ""  # the full path: the sandbox's log directory and the container's log_path

    def reserved_name(self, sandbox: SandboxInfo) -> str:
        return f"{self.name}_{sandbox.name}_{sandbox.namespace}_{sandbox.uid}_{self.attempt}"


_Info = TypeVar("_Info", SandboxInfo, ContainerInfo)


def save(directory: Path, info: SandboxInfo | ContainerInfo) -> None:
    kind = SANDBOX_RECORD if isinstance(info, SandboxInfo) else CONTAINER_RECORD
    atomic_write(directory / FILE_NAME, records.encode(kind, asdict(info)), mode=PRIVATE_FILE)


def load_sandbox(directory: Path) -> SandboxInfo | None:
    return _load(directory, SANDBOX_RECORD, SandboxInfo)


def load_container(directory: Path) -> ContainerInfo | None:
    return _load(directory, CONTAINER_RECORD, ContainerInfo)


def _load(directory: Path, kind: records.RecordKind, cls: type[_Info]) -> _Info | None:
    """None for a pod or container that the CLI made (it has no CRI record)."""
    path = directory / FILE_NAME
    raw = records.decode(kind, path)
    if raw is None:
        return None
    try:
        return cls(**raw)
    except TypeError as exc:
        raise records.not_understood(kind, path, exc) from None

