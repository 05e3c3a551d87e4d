"""Firecracker's configuration of one VM: the pre-boot API requests a VmSpec translates to, where the VMM's
files are (jailed or not), and the order the requests are sent in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from micropod.quotas import IoLimits
from micropod.vmm import firecracker_api as api
from micropod.vmm.base import GUEST_CID, VmSpec

API_SOCK = "api.sock"
VSOCK_SOCK = "vsock.sock"
VMM_LOG = "vmm.log"
# Firecracker writes its log and metrics into these fifos; micropod copies them into capped files.
VMM_LOG_FIFO = "vmm.log.fifo"
METRICS_FIFO = "metrics.fifo"
METRICS_FILE = "metrics.json"
KERNEL_IN_JAIL = "vmlinux"


@dataclass(frozen=True)
class VmmLayout:
    """Where the VMM's files are on the host, and the names Firecracker itself uses for them.

    Unjailed, Firecracker runs in ``root`` and is given bare names for the files there, which keeps
    its sockets within sun_path's 107 bytes. Jailed, it sees only its chroot, so every file it opens
    is placed in the chroot first and handed over by its in-jail absolute name.
    """

    root: Path
    jailed: bool

    def host(self, name: str) -> Path:
        return self.root / name

    def visible(self, name: str) -> str:
        return f"/{name}" if self.jailed else name

    def resource(self, host_path: Path, name_in_jail: str) -> str:
        """The path Firecracker is given for a host file (kernel, disk image)."""
        return f"/{name_in_jail}" if self.jailed else str(host_path)


def drive_file_in_jail(drive_id: str) -> str:
    return f"drive-{drive_id}"


@dataclass(frozen=True)
class FirecrackerConfig:
    """Every pre-boot request, in the order apply_config sends them."""

    logger: api.Logger
    metrics: api.Metrics
    boot_source: api.BootSource
    machine: api.MachineConfiguration
    drives: tuple[api.Drive, ...]
    nets: tuple[api.NetworkInterface, ...]
    vsock: api.Vsock
    entropy: api.EntropyDevice
    mmds_config: api.MmdsConfig | None = None
    mmds: dict[str, Any] | None = None


REFILL_MS = 1000  # a bucket of one second's worth, refilled every second: the rate in bytes (or ops) a second


def disk_limiter(limits: IoLimits) -> api.RateLimiter | None:
    """Firecracker's one limiter per drive counts reads and writes together: it takes the lower of the two rates
    (README's limits say so)."""
    if not limits:
        return None
    bps = min((r for r in (limits.read_bps, limits.write_bps) if r), default=0)
    iops = min((r for r in (limits.read_iops, limits.write_iops) if r), default=0)
    return api.RateLimiter(bandwidth=api.TokenBucket(size=bps, refill_time=REFILL_MS) if bps else None,
                           ops=api.TokenBucket(size=iops, refill_time=REFILL_MS) if iops else None)


# An absent limiter in a PATCH changes nothing; Firecracker takes a bucket of size 0 as no limit at all.
_EMPTY = api.TokenBucket(size=0, refill_time=0)
UNLIMITED = api.RateLimiter(bandwidth=_EMPTY, ops=_EMPTY)


def net_limiter(rate: int) -> api.RateLimiter | None:
    return api.RateLimiter(bandwidth=api.TokenBucket(size=rate, refill_time=REFILL_MS)) if rate else None


def build_config(spec: VmSpec, layout: VmmLayout) -> FirecrackerConfig:
    return FirecrackerConfig(
        logger=api.Logger(log_path=layout.visible(VMM_LOG_FIFO), level="Info", show_level=True),
        metrics=api.Metrics(metrics_path=layout.visible(METRICS_FIFO)),
        boot_source=api.BootSource(
            kernel_image_path=layout.resource(spec.kernel, KERNEL_IN_JAIL), boot_args=spec.cmdline
        ),
        machine=api.MachineConfiguration(vcpu_count=spec.vcpus, mem_size_mib=spec.memory_mib, smt=False),
        # spec.drives order is the guest's vda, vdb, ... order; Firecracker attaches in request order.
        drives=tuple(
            api.Drive(
                drive_id=drive.drive_id,
                is_root_device=drive.is_root,
                path_on_host=layout.resource(drive.path, drive_file_in_jail(drive.drive_id)),
                is_read_only=drive.read_only,
                rate_limiter=disk_limiter(drive.limits),
            )
            for drive in spec.drives
        ),
        nets=tuple(
            api.NetworkInterface(iface_id=net.iface_id, host_dev_name=net.tap, guest_mac=net.mac,
                                 rx_rate_limiter=net_limiter(net.rate), tx_rate_limiter=net_limiter(net.rate))
            for net in spec.nets
        ),
        vsock=api.Vsock(guest_cid=GUEST_CID, uds_path=layout.visible(VSOCK_SOCK)),
        entropy=api.EntropyDevice(),
        # MMDS v2 (session tokens) on the VM's NIC, at the default 169.254.169.254
        mmds_config=api.MmdsConfig(network_interfaces=(spec.nets[0].iface_id,), version="V2")
        if spec.mmds is not None and spec.nets else None,
        mmds=spec.mmds if spec.nets else None,
    )


def apply_config(client: api.FirecrackerClient, config: FirecrackerConfig) -> None:
    # Logger and metrics first so that Firecracker's complaints about the rest land in vmm.log.
    client.put_logger(config.logger)
    client.put_metrics(config.metrics)
    client.put_boot_source(config.boot_source)
    client.put_machine_config(config.machine)
    for drive in config.drives:
        client.put_drive(drive)
    for net in config.nets:
        client.put_network_interface(net)
    client.put_vsock(config.vsock)
    client.put_entropy(config.entropy)
    if config.mmds_config is not None and config.mmds is not None:
        client.put_mmds_config(config.mmds_config)
        client.put_mmds(config.mmds)
