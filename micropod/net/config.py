"""The network every VM joins: bridge name and subnet, with podman-like defaults."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from micropod.errors import UsageError

DEFAULT_BRIDGE = "micropod0"
DEFAULT_SUBNET = "10.88.0.0/16"
IFNAMSIZ = 15
_DEFAULT_NETWORK = ipaddress.IPv4Network(DEFAULT_SUBNET)


@dataclass(frozen=True)
class NetworkConfig:
    bridge: str = DEFAULT_BRIDGE
    subnet: ipaddress.IPv4Network = _DEFAULT_NETWORK

    @classmethod
    def parse(cls, bridge: str = DEFAULT_BRIDGE, subnet: str = DEFAULT_SUBNET) -> NetworkConfig:
        if not bridge or len(bridge) > IFNAMSIZ or "/" in bridge or bridge.strip() != bridge:
            raise UsageError(f"invalid bridge name {bridge!r}: 1 to {IFNAMSIZ} characters, no '/' or spaces")
        try:
            network = ipaddress.IPv4Network(subnet, strict=True)
        except ValueError as exc:
            raise UsageError(f"invalid subnet {subnet!r}: {exc}") from None
        if network.prefixlen > 30:
            raise UsageError(f"invalid subnet {subnet!r}: it needs room for a gateway and VMs (/30 or larger)")
        return cls(bridge, network)

    @classmethod
    def from_env(cls) -> NetworkConfig:
        return cls.parse(os.environ.get("MICROPOD_BRIDGE", DEFAULT_BRIDGE),
                         os.environ.get("MICROPOD_SUBNET", DEFAULT_SUBNET))

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The bridge's own address: the subnet's first host."""
        return self.subnet.network_address + 1

    @property
    def gateway_interface(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(f"{self.gateway}/{self.subnet.prefixlen}")


def icc_from_env() -> bool:
    """MICROPOD_ICC=0: a VM started with it exchanges nothing with other VMs but through published ports."""
    value = os.environ.get("MICROPOD_ICC", "1").strip().lower()
    if value not in ("0", "1", "false", "true"):
        raise UsageError(f"invalid MICROPOD_ICC {value!r}: use 1 (VMs reach each other, the default) or 0")
    return value in ("1", "true")
