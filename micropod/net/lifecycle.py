"""A container's networking through its life: planned at create, attached by the monitor at boot,
detached when the VM ends, its address released on rm, and a crashed run's leftovers reclaimed.

Only bridge-mode VMs touch the network stack; ``--network none`` VMs never load any of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from micropod.context import Context
from micropod.errors import UsageError
from micropod.net.addressing import mac_for, tap_name
from micropod.net.config import NetworkConfig, icc_from_env
from micropod.net.dns import check_nameserver, resolv_conf
from micropod.net.ports import PortMapping, parse_publish
from micropod.paths import StateRoot
from micropod.runconfig import NetworkSettings

MODES = ("bridge", "none")


@dataclass(frozen=True)
class Plan:
    network: NetworkConfig | None  # None: --network none
    ports: tuple[PortMapping, ...]
    resolv_conf: str


def default_mode() -> str:
    return os.environ.get("MICROPOD_NETWORK", "bridge")


def plan(ctx: Context, mode: str | None, publish: tuple[str, ...], dns: tuple[str, ...]) -> Plan:
    """Check everything the user asked for before anything is created."""
    mode = mode or default_mode()
    if mode not in MODES:
        raise UsageError(f"invalid --network {mode!r}: choose bridge or none")
    ports = tuple(parse_publish(spec) for spec in publish)
    servers = tuple(check_nameserver(server) for server in dns)
    if mode == "none":
        if ports:
            raise UsageError("--network none has no network to publish ports on; drop -p or the --network none")
        return Plan(None, (), resolv_conf(servers))
    network = NetworkConfig.from_env()
    icc_from_env()  # refused now rather than by the monitor at boot
    if ports:
        from micropod.service.reconcile import reconcile

        reconcile(ctx)  # a crashed run's rows must not hold its ports
        check_ports(ctx.root, ports)
    _check_bridge(ctx.root, network)
    return Plan(network, ports, resolv_conf(servers))


def check_ports(root: StateRoot, ports: tuple[PortMapping, ...]) -> None:
    from micropod.net.host import HostNetwork

    host = HostNetwork(root)
    try:
        host.check_ports(ports)
    finally:
        host.close()


def _check_bridge(root: StateRoot, network: NetworkConfig) -> None:
    """Early and without the lock: the bridge's name, subnet and owner (attach checks again under it)."""
    from micropod.net import owner
    from micropod.netlink import Rtnl

    with Rtnl() as rtnl:
        owner.check(rtnl, network, owner.Owner.of(root.path))


def lease(ctx: Context, plan: Plan, vm_id: str) -> NetworkSettings:
    if plan.network is None:
        return NetworkSettings(mode="none")
    from micropod.net.ipam import Ipam

    ipam = Ipam(ctx.root.db, plan.network)
    try:
        address = ipam.lease(vm_id)
    finally:
        ipam.close()
    return NetworkSettings(mode="bridge", bridge=plan.network.bridge, subnet=str(plan.network.subnet),
                           ip=str(address), mac=mac_for(vm_id), tap=tap_name(vm_id), ports=plan.ports)


def release_lease(root: StateRoot, vm_id: str) -> None:
    from micropod.net.ipam import Ipam

    ipam = Ipam(root.db, NetworkConfig())
    try:
        ipam.release(vm_id)
    finally:
        ipam.close()


def network_of(settings: NetworkSettings) -> NetworkConfig:
    return NetworkConfig.parse(settings.bridge, settings.subnet)


def attach(root: StateRoot, vm_id: str, settings: NetworkSettings, send_rate: int = 0, metadata_port: int = 0) -> None:
    """The monitor's part at boot: the VM's TAP on the bridge, and its rules (with a limit on what the guest
    sends, ``send_rate`` bytes per second, 0 for none, and its metadata requests sent to ``metadata_port``)."""
    import ipaddress

    from micropod.net.host import HostNetwork
    from micropod.net.nft import VmNetwork

    host = HostNetwork(root)
    try:
        host.attach(VmNetwork(vm_id, settings.tap, settings.mac, ipaddress.IPv4Address(settings.ip), settings.ports,
                              network_of(settings), icc_from_env(), send_rate, metadata_port))
    finally:
        host.close()


def set_send_rate(root: StateRoot, vm_id: str, rate: int) -> None:
    from micropod.net.host import HostNetwork

    host = HostNetwork(root)
    try:
        host.set_rate(vm_id, rate)
    finally:
        host.close()


def detach(root: StateRoot, vm_id: str) -> bool:
    """Idempotent; everything needed is in the VM's attachment row (or its TAP's name)."""
    from micropod.net.host import HostNetwork

    host = HostNetwork(root)
    try:
        return host.detach(vm_id)
    finally:
        host.close()


def agent_request(settings: NetworkSettings) -> dict[str, object]:
    """What the guest agent needs to address its NIC: on micropod's bridge, the bridge is the gateway; a CNI pod
    takes the address, prefix and gateway that CNI gave (no gateway: no default route)."""
    if settings.mode == "cni":
        import ipaddress

        prefix, gateway = ipaddress.IPv4Network(settings.subnet).prefixlen, settings.gateway
    else:
        network = network_of(settings)
        prefix, gateway = network.subnet.prefixlen, str(network.gateway)
    return {"interfaces": [{"ifname": "eth0", "mac": settings.mac, "address": f"{settings.ip}/{prefix}",
                            "gateway": gateway}]}
