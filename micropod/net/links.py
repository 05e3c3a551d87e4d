"""The bridge and the per-VM TAP devices, through netlink (pyroute2), never `ip` in the hot path."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from micropod.errors import ConflictError, MicropodError
from micropod.net.config import NetworkConfig


class NetworkError(MicropodError):
    """Setting up or tearing down VM networking failed."""


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def check_no_collision(ipr: IPRoute, network: NetworkConfig) -> None:
    """Refuse a subnet that overlaps an address on another interface of this host (or namespace)."""
    bridge = _index(ipr, network.bridge)
    for address in ipr.get_addr(family=2):
        if address["index"] == bridge:
            continue
        cidr = ipaddress.IPv4Interface(f"{address.get_attr('IFA_ADDRESS')}/{address['prefixlen']}")
        if cidr.network.overlaps(network.subnet) and not cidr.network.is_loopback:
            name = ipr.get_links(address["index"])[0].get_attr("IFLA_IFNAME")
            raise ConflictError(f"subnet {network.subnet} collides with {cidr} on {name}; "
                                "choose another with MICROPOD_SUBNET")


def ensure_bridge(network: NetworkConfig) -> None:
    """Create the bridge with the gateway address if it is missing; check an existing one is ours."""
    with IPRoute() as ipr:
        index = _index(ipr, network.bridge)
        if index is not None:
            kind = ipr.get_links(index)[0].get_attr("IFLA_LINKINFO")
            if kind is None or kind.get_attr("IFLA_INFO_KIND") != "bridge":
                raise ConflictError(f"{network.bridge} exists and is not a bridge; choose another with MICROPOD_BRIDGE")
            addresses = {f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=index, family=2)}
            if str(network.gateway_interface) not in addresses:
                raise ConflictError(f"bridge {network.bridge} exists without {network.gateway_interface}; "
                                    "it belongs to another network")
            return
        check_no_collision(ipr, network)
        try:
            ipr.link("add", ifname=network.bridge, kind="bridge")
            index = _index(ipr, network.bridge)
            assert index is not None
            ipr.addr("add", index=index, address=str(network.gateway), prefixlen=network.subnet.prefixlen)
            ipr.link("set", index=index, state="up")
        except NetlinkError as exc:
            raise NetworkError(f"cannot create bridge {network.bridge}: {exc}") from exc
    # Forwarding between the bridge and the uplink, and DNAT of connections to 127.0.0.1.
    _sysctl("net/ipv4/ip_forward", "1")
    _sysctl(f"net/ipv4/conf/{network.bridge}/route_localnet", "1")


def create_tap(name: str, bridge: str) -> None:
    """A persistent TAP, enslaved to the bridge and up; QEMU or Firecracker opens it by name."""
    with IPRoute() as ipr:
        try:
            if _index(ipr, name) is None:
                ipr.link("add", ifname=name, kind="tuntap", mode="tap")
            index, master = _index(ipr, name), _index(ipr, bridge)
            assert index is not None
            if master is None:
                raise NetworkError(f"bridge {bridge} does not exist")
            ipr.link("set", index=index, master=master, state="up")
        except NetlinkError as exc:
            delete_tap(name)
            raise NetworkError(f"cannot create TAP {name}: {exc}") from exc


def delete_tap(name: str) -> None:
    """Idempotent: a TAP that is already gone is fine."""
    with IPRoute() as ipr:
        index = _index(ipr, name)
        if index is not None:
            try:
                ipr.link("del", index=index)
            except NetlinkError as exc:
                if exc.code != 19:  # ENODEV: gone meanwhile
                    raise NetworkError(f"cannot delete TAP {name}: {exc}") from exc


def link_exists(name: str) -> bool:
    with IPRoute() as ipr:
        return _index(ipr, name) is not None


def _sysctl(key: str, value: str) -> None:
    path = Path("/proc/sys") / key
    try:
        if path.read_text().strip() != value:
            path.write_text(value)
    except OSError as exc:
        raise NetworkError(f"cannot set {key.replace('/', '.')}={value}: {exc.strerror}") from exc
