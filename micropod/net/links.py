"""The bridge and the per-VM TAP devices, over rtnetlink (micropod.netlink); never `ip` shell-outs."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from micropod import syscalls
from micropod.errors import ConflictError, NetworkError
from micropod.net.config import NetworkConfig
from micropod.netlink import ENODEV, NetlinkError, Rtnl, index_of


def _name(index: int) -> str:
    import socket

    try:
        return socket.if_indextoname(index)
    except OSError:
        return f"interface {index}"


def check_bridge(rtnl: Rtnl, network: NetworkConfig) -> bool:
    """True if our bridge is already there; a ConflictError if the name or the subnet is someone else's."""
    bridge = index_of(network.bridge)
    addresses = rtnl.addresses()
    if bridge is not None:
        if rtnl.link_kind(bridge) != "bridge":
            raise ConflictError(f"{network.bridge} exists and is not a bridge; choose another with MICROPOD_BRIDGE")
        ours = {f"{address}/{prefix}" for index, address, prefix in addresses if index == bridge}
        if str(network.gateway_interface) not in ours:
            raise ConflictError(f"bridge {network.bridge} exists without {network.gateway_interface}; "
                                "it belongs to another network (choose another with MICROPOD_BRIDGE)")
    for index, address, prefix in addresses:
        cidr = ipaddress.IPv4Interface(f"{address}/{prefix}")
        if index != bridge and not cidr.network.is_loopback and cidr.network.overlaps(network.subnet):
            raise ConflictError(f"subnet {network.subnet} collides with {cidr} on {_name(index)}; "
                                "choose another with MICROPOD_SUBNET")
    return bridge is not None


def ensure_owned_bridge(network: NetworkConfig, alias: str) -> None:
    """Create the bridge with the gateway address if it is missing; either way it carries ``alias``,
    the owner's record (``owner`` decides who may have it)."""
    with Rtnl() as rtnl:
        if not check_bridge(rtnl, network):
            _create_bridge(rtnl, network, alias)
        index = index_of(network.bridge)
        try:
            if index is None:
                raise NetworkError(f"bridge {network.bridge} vanished while it was set up")
            if rtnl.link_alias(index) != alias:
                rtnl.set_alias(index, alias)
        except NetlinkError as exc:
            raise NetworkError(f"cannot record the owner of bridge {network.bridge}: {exc.strerror}") from exc
    # Every time, not only at creation: something may have reset them since (sysctl --system).
    # Forwarding between the bridge and the uplink, and DNAT of connections to 127.0.0.1.
    _sysctl("net/ipv4/ip_forward", "1")
    _sysctl(f"net/ipv4/conf/{network.bridge}/route_localnet", "1")


def _create_bridge(rtnl: Rtnl, network: NetworkConfig, alias: str) -> None:
    try:
        rtnl.add_link(network.bridge, "bridge")
        index = index_of(network.bridge)
        if index is None:
            raise NetworkError(f"bridge {network.bridge} vanished right after it was created")
        try:
            # the owner first: a bridge seen without it is nobody's yet, and another root waits on the lock
            rtnl.set_alias(index, alias)
            rtnl.add_address(index, str(network.gateway), network.subnet.prefixlen)
            rtnl.set_link(index, up=True)
        except BaseException:
            # half a bridge (no address) would pass for someone else's and block every later run
            rtnl.delete_link(index)
            raise
    except NetlinkError as exc:
        raise NetworkError(f"cannot create bridge {network.bridge}: {exc.strerror}") from exc


def create_tap(name: str, bridge: str) -> None:
    """A persistent TAP, enslaved to the bridge and up; QEMU or Firecracker opens it by name."""
    try:
        if index_of(name) is None:
            syscalls.create_persistent_tap(name)
        index, master = index_of(name), index_of(bridge)
        if index is None:
            raise NetworkError(f"TAP {name} vanished right after it was created")
        if master is None:
            raise NetworkError(f"bridge {bridge} does not exist")
        with Rtnl() as rtnl:
            rtnl.set_link(index, up=True, master=master)
    except OSError as exc:
        delete_tap(name)
        raise NetworkError(f"cannot create TAP {name}: {exc.strerror}") from exc
    except NetworkError:
        delete_tap(name)
        raise


def delete_tap(name: str) -> None:
    """Idempotent: a TAP that is already gone is fine."""
    index = index_of(name)
    if index is None:
        return
    with Rtnl() as rtnl:
        try:
            rtnl.delete_link(index)
        except NetlinkError as exc:
            if exc.errno != ENODEV:  # gone meanwhile
                raise NetworkError(f"cannot delete TAP {name}: {exc.strerror}") from exc


def link_exists(name: str) -> bool:
    return index_of(name) is not None


def _sysctl(key: str, value: str) -> None:
    path = Path("/proc/sys") / key
    try:
        if path.read_text().strip() != value:
            path.write_text(value)
    except OSError as exc:
        raise NetworkError(f"cannot set {key.replace('/', '.')}={value}: {exc.strerror}") from exc
