"""Firecracker's REST API (v1.16 swagger), spoken as HTTP/1.1 over the API Unix socket.

Request bodies are frozen dataclasses whose class and field names are the swagger definitions' own
(``BootSource.kernel_image_path`` ...), so a body can be checked against the spec by name. Fields left
as None are omitted: Firecracker rejects unknown fields and fills in its defaults for absent ones.

A 4xx/5xx answer becomes FirecrackerApiError carrying Firecracker's ``fault_message`` verbatim, so
the user reads Firecracker's own words; a broken socket becomes VmmError.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx

from micropod.errors import FirecrackerApiError, VmmError

ActionType = Literal["InstanceStart", "SendCtrlAltDel", "FlushMetrics"]
VmState = Literal["Paused", "Resumed"]
LogLevel = Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"]
CacheType = Literal["Unsafe", "Writeback"]
IoEngine = Literal["Sync", "Async"]
HugePages = Literal["None", "2M"]
MmdsVersion = Literal["V1", "V2"]


@dataclass(frozen=True)
class TokenBucket:
    size: int
    refill_time: int
    one_time_burst: int | None = None


@dataclass(frozen=True)
class RateLimiter:
    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None


@dataclass(frozen=True)
class BootSource:
    kernel_image_path: str
    boot_args: str | None = None
    initrd_path: str | None = None


@dataclass(frozen=True)
class MachineConfiguration:
    vcpu_count: int
    mem_size_mib: int
    smt: bool | None = None
    track_dirty_pages: bool | None = None
    huge_pages: HugePages | None = None


@dataclass(frozen=True)
class Drive:
    drive_id: str
    is_root_device: bool
    path_on_host: str | None = None
    is_read_only: bool | None = None
    partuuid: str | None = None
    cache_type: CacheType | None = None
    io_engine: IoEngine | None = None
    rate_limiter: RateLimiter | None = None


@dataclass(frozen=True)
class PartialDrive:
    """The post-boot drive update: swap a placeholder's backing file (as Kata does) or its limiter."""

    drive_id: str
    path_on_host: str | None = None
    rate_limiter: RateLimiter | None = None


@dataclass(frozen=True)
class PartialNetworkInterface:
    """The post-boot interface update: its rate limiters."""

    iface_id: str
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None


@dataclass(frozen=True)
class NetworkInterface:
    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None
    mtu: int | None = None
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None


@dataclass(frozen=True)
class Vsock:
    guest_cid: int
    uds_path: str


@dataclass(frozen=True)
class Logger:
    log_path: str | None = None
    level: LogLevel | None = None
    show_level: bool | None = None
    show_log_origin: bool | None = None
    module: str | None = None


@dataclass(frozen=True)
class Metrics:
    metrics_path: str


@dataclass(frozen=True)
class EntropyDevice:
    rate_limiter: RateLimiter | None = None


@dataclass(frozen=True)
class MmdsConfig:
    network_interfaces: tuple[str, ...]
    version: MmdsVersion | None = None
    ipv4_address: str | None = None
    imds_compat: bool | None = None


@dataclass(frozen=True)
class InstanceActionInfo:
    action_type: ActionType


@dataclass(frozen=True)
class Vm:
    state: VmState


@dataclass(frozen=True)
class InstanceInfo:
    """GET / — state is "Not started", "Running" or "Paused"."""

    app_name: str
    id: str
    state: str
    vmm_version: str


# Every request body the client can send, by swagger definition name (the class names match).
REQUEST_BODIES: tuple[type, ...] = (
    TokenBucket, RateLimiter, BootSource, MachineConfiguration, Drive, PartialDrive, NetworkInterface,
    Vsock, Logger, Metrics, EntropyDevice, MmdsConfig, InstanceActionInfo, Vm,
)


def to_json(value: Any) -> Any:
    """A request dataclass as the JSON Firecracker expects: None fields omitted, tuples as arrays."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_json(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if getattr(value, f.name) is not None
        }
    if isinstance(value, tuple | list):
        return [to_json(item) for item in value]
    return value


def _path_param(value: str) -> str:
    return quote(value, safe="")


class FirecrackerClient:
    """One Firecracker instance's API; keeps a single keep-alive connection."""

    def __init__(self, socket_path: Path, *, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket_path)),
            # The host is ignored on a Unix socket; Firecracker's docs use "localhost".
            base_url="http://localhost",
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FirecrackerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; the decoded JSON answer, or None for 204."""
        content = None if body is None else json.dumps(to_json(body)).encode()
        headers = {"Accept": "application/json"}
        if content is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = self._http.request(method, path, content=content, headers=headers)
        except httpx.TransportError as exc:
            raise VmmError(
                f"firecracker: {method} {path}: cannot talk to the API socket {self.socket_path}: {exc}"
            ) from exc
        if response.status_code >= 400:
            raise FirecrackerApiError(method, path, response.status_code, _fault_message(response))
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise VmmError(f"firecracker: {method} {path}: answer is not JSON: {response.text[:200]}") from exc

    # Pre-boot configuration.

    def put_logger(self, logger: Logger) -> None:
        self.request("PUT", "/logger", logger)

    def put_metrics(self, metrics: Metrics) -> None:
        self.request("PUT", "/metrics", metrics)

    def put_boot_source(self, boot_source: BootSource) -> None:
        self.request("PUT", "/boot-source", boot_source)

    def put_machine_config(self, machine: MachineConfiguration) -> None:
        self.request("PUT", "/machine-config", machine)

    def put_drive(self, drive: Drive) -> None:
        self.request("PUT", f"/drives/{_path_param(drive.drive_id)}", drive)

    def put_network_interface(self, iface: NetworkInterface) -> None:
        self.request("PUT", f"/network-interfaces/{_path_param(iface.iface_id)}", iface)

    def put_vsock(self, vsock: Vsock) -> None:
        self.request("PUT", "/vsock", vsock)

    def put_entropy(self, entropy: EntropyDevice) -> None:
        self.request("PUT", "/entropy", entropy)

    def put_mmds_config(self, config: MmdsConfig) -> None:
        self.request("PUT", "/mmds/config", config)

    def put_mmds(self, data: dict[str, Any]) -> None:
        self.request("PUT", "/mmds", data)

    def patch_mmds(self, data: dict[str, Any]) -> None:
        """A JSON merge patch (RFC 7396) of the data store."""
        self.request("PATCH", "/mmds", data)

    # Actions.

    def action(self, action_type: ActionType) -> None:
        self.request("PUT", "/actions", InstanceActionInfo(action_type))

    def instance_start(self) -> None:
        self.action("InstanceStart")

    def send_ctrl_alt_del(self) -> None:
        self.action("SendCtrlAltDel")

    def flush_metrics(self) -> None:
        self.action("FlushMetrics")

    # Post-boot control.

    def patch_drive(self, update: PartialDrive) -> None:
        self.request("PATCH", f"/drives/{_path_param(update.drive_id)}", update)

    def patch_network_interface(self, update: PartialNetworkInterface) -> None:
        self.request("PATCH", f"/network-interfaces/{_path_param(update.iface_id)}", update)

    def patch_vm(self, state: VmState) -> None:
        self.request("PATCH", "/vm", Vm(state))

    def pause(self) -> None:
        self.patch_vm("Paused")

    def resume(self) -> None:
        self.patch_vm("Resumed")

    # Queries.

    def get_instance_info(self) -> InstanceInfo:
        data = self._object("GET", "/")
        try:
            return InstanceInfo(
                app_name=str(data["app_name"]), id=str(data["id"]),
                state=str(data["state"]), vmm_version=str(data["vmm_version"]),
            )
        except KeyError as exc:
            raise VmmError(f"firecracker: GET /: answer lacks {exc}") from exc

    def get_machine_config(self) -> MachineConfiguration:
        data = self._object("GET", "/machine-config")
        try:
            return MachineConfiguration(
                vcpu_count=int(data["vcpu_count"]),
                mem_size_mib=int(data["mem_size_mib"]),
                smt=data.get("smt"),
                track_dirty_pages=data.get("track_dirty_pages"),
                huge_pages=data.get("huge_pages"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise VmmError(f"firecracker: GET /machine-config: unexpected answer {data!r}") from exc

    def _object(self, method: str, path: str) -> dict[str, Any]:
        data = self.request(method, path)
        if not isinstance(data, dict):
            raise VmmError(f"firecracker: {method} {path}: expected a JSON object, got {data!r}")
        return data


def _fault_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    if isinstance(data, dict) and isinstance(data.get("fault_message"), str):
        return str(data["fault_message"])
    return json.dumps(data)
