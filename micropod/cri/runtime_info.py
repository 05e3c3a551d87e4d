"""What the runtime says about itself (Version, Status, RuntimeConfig) and the runtime handlers that
RuntimeClasses name: each picks a VMM and the default size of its sandboxes' VMs."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from micropod.context import Context
from micropod.cri.api import pb
from micropod.cri.network import PodNetworks
from micropod.errors import MicropodError, UsageError
from micropod.jsonfile import read_json_object
from micropod.units import parse_memory_mib

RUNTIME_NAME = "micropod"
API_VERSION = "v1"
MAX_CONFIG = 1 << 20


@dataclass(frozen=True)
class HandlerSettings:
    """A RuntimeClass's handler: the VMM, and the VM's size when the pod gives no resources."""

    vmm: str = "auto"
    vcpus: int = 1
    memory_mib: int = 512
    # a shared directory in each QEMU sandbox, for host path mounts (QEMU then runs as root, as for any share)
    host_paths: bool = True


DEFAULT_HANDLERS = {
    "": HandlerSettings(),
    "micropod": HandlerSettings(),
    "micropod-qemu": HandlerSettings(vmm="qemu"),
    "micropod-firecracker": HandlerSettings(vmm="firecracker"),
}


def load_handlers(path: Path | None) -> dict[str, HandlerSettings]:
    """``{"runtime_handlers": {"NAME": {"vmm": "qemu", "vcpus": 2, "memory": "1G"}}}``, over the defaults."""
    handlers = dict(DEFAULT_HANDLERS)
    if path is None:
        return handlers
    raw = read_json_object(path, MAX_CONFIG, f"the CRI config {path}", UsageError)
    assert raw is not None
    table = raw.get("runtime_handlers", {})
    if not isinstance(table, dict):
        raise UsageError(f"{path}: runtime_handlers must be an object")
    for name, entry in table.items():
        handlers[str(name)] = _handler(path, str(name), entry)
    return handlers


def _handler(path: Path, name: str, entry: Any) -> HandlerSettings:
    from micropod.vmm.factory import BACKENDS

    if not isinstance(entry, dict) or set(entry) - {"vmm", "vcpus", "memory", "host_paths"}:
        raise UsageError(f"{path}: runtime handler {name!r} takes only vmm, vcpus, memory and host_paths")
    vmm = entry.get("vmm", "auto")
    vcpus = entry.get("vcpus", 1)
    if vmm not in BACKENDS:
        raise UsageError(f"{path}: runtime handler {name!r}: vmm must be one of {', '.join(BACKENDS)}")
    if isinstance(vcpus, bool) or not isinstance(vcpus, int) or not 1 <= vcpus <= 64:
        raise UsageError(f"{path}: runtime handler {name!r}: vcpus must be 1 to 64")
    host_paths = entry.get("host_paths", True)
    if not isinstance(host_paths, bool):
        raise UsageError(f"{path}: runtime handler {name!r}: host_paths must be true or false")
    return HandlerSettings(vmm, vcpus, parse_memory_mib(str(entry.get("memory", "512M"))), host_paths)


def micropod_version() -> str:
    try:
        return version("micropod")
    except PackageNotFoundError:
        return "0.0.0"


class RuntimeInfo:
    service = "RuntimeService"

    def __init__(self, handlers: dict[str, HandlerSettings], networks: PodNetworks) -> None:
        self.handlers = handlers
        self.networks = networks

    def Version(self, ctx: Context, request: pb.VersionRequest) -> pb.VersionResponse:
        return pb.VersionResponse(version="0.1.0", runtime_name=RUNTIME_NAME, runtime_version=micropod_version(),
                                  runtime_api_version=API_VERSION)

    def Status(self, ctx: Context, request: pb.StatusRequest) -> pb.StatusResponse:
        runtime_ready, runtime_reason = _runtime_ready()
        network_ready, network_reason, network_message = self.networks.describe()
        conditions = [
            pb.RuntimeCondition(type="RuntimeReady", status=runtime_ready,
                                reason="" if runtime_ready else "MicropodNotReady", message=runtime_reason),
            pb.RuntimeCondition(type="NetworkReady", status=network_ready, reason=network_reason,
                                message=network_message),
        ]
        handlers = [pb.RuntimeHandler(name=name, features=pb.RuntimeHandlerFeatures())
                    for name in sorted(self.handlers)]
        info = {"network": network_message} if request.verbose else {}
        return pb.StatusResponse(status=pb.RuntimeStatus(conditions=conditions), runtime_handlers=handlers,
                                 info=info)

    def RuntimeConfig(self, ctx: Context, request: pb.RuntimeConfigRequest) -> pb.RuntimeConfigResponse:
        return pb.RuntimeConfigResponse(linux=pb.LinuxRuntimeConfiguration(cgroup_driver=pb.CGROUPFS))

    def UpdateRuntimeConfig(self, ctx: Context,
                            request: pb.UpdateRuntimeConfigRequest) -> pb.UpdateRuntimeConfigResponse:
        # The pod CIDR is kubelet's for CNI's host-local ranges; micropod's bridge leases from its own subnet.
        return pb.UpdateRuntimeConfigResponse()


def _runtime_ready() -> tuple[bool, str]:
    from micropod.guest.artefacts import locate
    from micropod.vmm.factory import check_available, resolve_backend

    try:
        locate()
        check_available(resolve_backend("auto"))
    except MicropodError as exc:
        return False, str(exc)
    return True, ""
