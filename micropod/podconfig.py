"""What `pod create` asked for: the pod's VM (its VMM, size and network) and its drive pool, as plain data in
the pod's config.json. Its containers keep their own RunConfig; the pod's values size the VM."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from micropod.errors import StateError, UsageError
from micropod.fsutil import PRIVATE_FILE, atomic_write
from micropod.quotas import Quotas
from micropod.runconfig import NetworkSettings
from micropod.state import records

# config.json of a pod. 0: as first written; 1: the network's netns and gateway, a CNI pod's (absent: none),
# and host_share (absent: none).
POD_CONFIG = records.RecordKind("pod's config.json", upgrades=(lambda raw: raw,))

DEFAULT_POOL = 4
SHARED_DIR = "shared"  # in the pod's directory: its shared directory, when it has one
# QEMU: SCSI targets on one controller (255 at most); Firecracker: placeholder drives, which with the system
# disk, a NIC and vsock must fit its virtio-mmio devices (IRQs 5 to 23).
MAX_POOL = {"qemu": 64, "firecracker": 8}


def check_pool(size: int, backend: str) -> int:
    limit = MAX_POOL.get(backend, 8)
    if not 1 <= size <= limit:
        raise UsageError(f"invalid --drive-pool {size}: a pod on {backend} holds 1 to {limit} read-only and as "
                         "many writable disks")
    return size


@dataclass(frozen=True)
class PodConfig:
    pod_id: str
    name: str
    backend: str
    kernel: str
    system: str
    vcpus: int
    memory_mib: int
    hostname: str
    cpu_limit: float = 0.0
    boot_timeout: float = 60.0
    # Placeholder drives the VM boots with, ``pool`` read-only and ``pool`` writable: containers added later
    # get their image's base, their writable layer and their volumes on them (micropod/monitor/pool.py).
    pool: int = DEFAULT_POOL
    labels: dict[str, str] = field(default_factory=dict)
    hosts: str | None = None
    resolv_conf: str | None = None
    vmm_confinement: bool = True
    network: NetworkSettings = field(default_factory=NetworkSettings)
    quotas: Quotas = field(default_factory=Quotas)
    # QEMU: a shared directory from boot (virtio-9p), where the host binds its containers' host paths
    # (micropod/service/podshare.py), bound into a confined QEMU's jail (micropod/vmm/qemu_confined.py).
    host_share: bool = False

    @property
    def vm_id(self) -> str:
        return self.pod_id

    def dump(self, path: Path) -> None:
        atomic_write(path, records.encode(POD_CONFIG, asdict(self)), mode=PRIVATE_FILE)

    @classmethod
    def load(cls, path: Path) -> PodConfig:
        raw = records.decode(POD_CONFIG, path)
        if raw is None:
            raise StateError(f"{path}: the {POD_CONFIG.name} is gone")
        try:
            network = NetworkSettings.from_json(raw.pop("network", {}))
            return cls(network=network, quotas=Quotas.from_json(raw.pop("quotas", {})), **raw)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise records.not_understood(POD_CONFIG, path, exc) from None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
