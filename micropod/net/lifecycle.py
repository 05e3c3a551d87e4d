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
from micropod.net.config import NetworkConfig
from micropod.net.dns import check_nameserver, resolv_conf
from micropod.net.ports import PortMapping, check_host_port_free, check_unique, parse_publish
from micropod.paths import StateRoot
from micropod.runconfig import NetworkSettings, RunConfig
from micropod.state import ACTIVE, VmRecord

MODES = ("bridge", "none")


@dataclass(frozen=True)
class Plan:
    mode: str
    network: NetworkConfig | None
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
        return Plan(mode, None, (), resolv_conf(servers))
    network = NetworkConfig.from_env()
    if ports:
        check_ports(ctx.root, network, ports)
    _check_bridge(network)
    return Plan(mode, network, ports, resolv_conf(servers))


def check_ports(root: StateRoot, network: NetworkConfig, ports: tuple[PortMapping, ...]) -> None:
    from micropod.net.host import HostNetwork

    host = HostNetwork(root, network)
    try:
        check_unique(list(ports), host.published())
    finally:
        host.close()
    for port in ports:
        check_host_port_free(port)


def _check_bridge(network: NetworkConfig) -> None:
    from micropod.net.links import check_bridge
    from micropod.netlink import Rtnl

    with Rtnl() as rtnl:
        check_bridge(rtnl, network)


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


def release(ctx: Context, vm_id: str) -> None:
    release_lease(ctx.root, vm_id)


def release_lease(root: StateRoot, vm_id: str) -> None:
    from micropod.net.ipam import Ipam

    ipam = Ipam(root.db, NetworkConfig())
    try:
        ipam.release(vm_id)
    finally:
        ipam.close()


def network_of(settings: NetworkSettings) -> NetworkConfig:
    return NetworkConfig.parse(settings.bridge, settings.subnet)


def attach(root: StateRoot, vm_id: str, settings: NetworkSettings) -> None:
    """The monitor's part at boot: the VM's TAP on the bridge, and its rules."""
    import ipaddress

    from micropod.net.host import HostNetwork
    from micropod.net.nft import VmNetwork

    host = HostNetwork(root, network_of(settings))
    try:
        host.attach(VmNetwork(vm_id, settings.tap, settings.mac, ipaddress.IPv4Address(settings.ip), settings.ports))
    finally:
        host.close()


def detach(root: StateRoot, vm_id: str, settings: NetworkSettings | None = None) -> bool:
    """Idempotent; safe with or without the VM's settings (a crashed run may have lost them)."""
    from micropod.net.host import HostNetwork

    network = network_of(settings) if settings is not None and settings.enabled else NetworkConfig.from_env()
    host = HostNetwork(root, network)
    try:
        return host.detach(vm_id)
    finally:
        host.close()


def teardown(ctx: Context, vm_id: str) -> None:
    """Detach a container being removed, with its own settings when its config is still readable."""
    cfg = RunConfig.load_if_readable(ctx.root.vm(vm_id).config)
    detach(ctx.root, vm_id, cfg.network if cfg else None)


def agent_request(settings: NetworkSettings) -> dict[str, object]:
    """What the guest agent needs to address its NIC."""
    network = network_of(settings)
    return {"interfaces": [{"ifname": "eth0", "mac": settings.mac,
                            "address": f"{settings.ip}/{network.subnet.prefixlen}",
                            "gateway": str(network.gateway)}]}


def reconcile(ctx: Context) -> list[VmRecord]:
    """The state store's reconciliation, then a crashed run's network leftovers: TAPs and rules of VMs
    that no longer run, addresses of VMs that no longer exist. Cheap when there is nothing to do.

    The leftovers are read before the records: a VM records itself before it leases or attaches, so
    a run starting meanwhile is never mistaken for a leftover.
    """
    import sqlite3

    try:
        conn = sqlite3.connect(ctx.root.db, timeout=30.0)
        try:
            attached, leased = _ids(conn, "attachments"), _ids(conn, "leases")
        finally:
            conn.close()
    except sqlite3.Error:
        attached, leased = set(), set()
    records = ctx.state.reconcile()
    active = {r.id for r in records if r.status in ACTIVE}
    for vm_id in attached - active:
        detach(ctx.root, vm_id)
    if leased - {r.id for r in records}:
        from micropod.net.ipam import Ipam

        ipam = Ipam(ctx.root.db, NetworkConfig())
        try:
            ipam.reclaim(r.id for r in records)
        finally:
            ipam.close()
    return records


def _ids(conn: object, table: str) -> set[str]:
    import sqlite3

    assert isinstance(conn, sqlite3.Connection)
    try:
        return {row[0] for row in conn.execute(f"SELECT vm_id FROM {table}")}
    except sqlite3.OperationalError:  # the table does not exist yet: nothing was ever attached or leased
        return set()
