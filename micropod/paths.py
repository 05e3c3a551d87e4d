"""Typed paths: one object per directory, one method per path, ids validated before joining."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from micropod.errors import UsageError

DEFAULT_ROOT = Path("/var/lib/micropod")
DEFAULT_CACHE = Path("/var/cache/micropod")

_VM_ID = re.compile(r"^[0-9a-f]{64}$")
_DIGEST_HEX = re.compile(r"^[0-9a-f]{64}$")


def switched_on(name: str) -> bool:
    """A MICROPOD_* switch: on unless set to 0, false, no or off."""
    return os.environ.get(name, "1") not in ("0", "false", "no", "off")


def check_vm_id(vm_id: str) -> str:
    if not _VM_ID.match(vm_id):
        raise UsageError(f"invalid VM id {vm_id!r}")
    return vm_id


def check_hex_digest(hexdigest: str) -> str:
    if not _DIGEST_HEX.match(hexdigest):
        raise UsageError(f"invalid sha256 digest {hexdigest!r}")
    return hexdigest


@dataclass(frozen=True)
class VmDir:
    """Everything one VM keeps on the host."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def upper(self) -> Path:
        return self.path / "upper.ext4"

    @property
    def api_sock(self) -> Path:
        return self.path / "api.sock"

    @property
    def vsock(self) -> Path:
        return self.path / "vsock.sock"

    @property
    def agent_sock(self) -> Path:
        return self.path / "agent.sock"

    @property
    def qmp_sock(self) -> Path:
        return self.path / "qmp.sock"

    @property
    def monitor_sock(self) -> Path:
        return self.path / "monitor.sock"

    @property
    def console_log(self) -> Path:
        return self.path / "console.log"

    @property
    def container_log(self) -> Path:
        return self.path / "container.log"

    @property
    def monitor_log(self) -> Path:
        return self.path / "monitor.log"

    @property
    def vmm_log(self) -> Path:
        return self.path / "vmm.log"


@dataclass(frozen=True)
class StateRoot:
    """The state root (default /var/lib/micropod; --root or MICROPOD_ROOT to change)."""

    path: Path

    @classmethod
    def from_env(cls, root: str | os.PathLike[str] | None = None) -> StateRoot:
        chosen = root or os.environ.get("MICROPOD_ROOT") or DEFAULT_ROOT
        return cls(Path(chosen).absolute())

    @property
    def db(self) -> Path:
        return self.path / "state.db"

    @property
    def images(self) -> Path:
        return self.path / "images"

    @property
    def rootfs_dir(self) -> Path:
        return self.path / "rootfs"

    def rootfs(self, config_hex: str) -> Path:
        return self.rootfs_dir / f"{check_hex_digest(config_hex)}.sqfs"

    @property
    def vms(self) -> Path:
        return self.path / "vms"

    def vm(self, vm_id: str) -> VmDir:
        return VmDir(self.vms / check_vm_id(vm_id))

    @property
    def pods(self) -> Path:
        return self.path / "pods"

    def pod(self, pod_id: str) -> VmDir:
        """A pod's VM keeps the files every VM keeps (config.json is the pod's PodConfig)."""
        return VmDir(self.pods / check_vm_id(pod_id))

    @property
    def tmp(self) -> Path:
        return self.path / "tmp"

    @property
    def volumes(self) -> Path:
        return self.path / "volumes"

    def ensure(self) -> StateRoot:
        from micropod.fsutil import private_dir

        for d in (self.path, self.images, self.rootfs_dir, self.vms, self.pods, self.tmp):
            private_dir(d)
        return self


@dataclass(frozen=True)
class CacheRoot:
    """Build caches shared by every state root (default /var/cache/micropod; MICROPOD_CACHE)."""

    path: Path

    @classmethod
    def from_env(cls) -> CacheRoot:
        return cls(Path(os.environ.get("MICROPOD_CACHE") or DEFAULT_CACHE).absolute())

    def guest(self, key: str) -> Path:
        """Built guest artefacts (vmlinux, system.sqfs), keyed by the hash of their inputs."""
        return self.path / "guest" / key

    @property
    def downloads(self) -> Path:
        return self.path / "downloads"

    @property
    def kernel_src(self) -> Path:
        return self.path / "kernel-src"
