"""micropod's whole nftables state, built as data and applied in one atomic `nft -j -f` transaction.

Two tables, each replaced wholesale from the list of VMs on every change, so that applying is
idempotent and teardown is exact (a VM's rules disappear with the VM from the list):

- ``inet micropod``: per network, masquerade for egress from the subnet, hairpin masquerade for VMs
  reaching published ports over the bridge, and masquerade of the 127.0.0.1-sourced connections that
  DNAT sends to the bridge. DNAT for published ports: from other hosts in prerouting (never for a
  port published on a loopback address), from the host itself through localhost in output.
- ``netdev micropod``: an ingress chain per TAP that admits only the VM's own MAC and IPv4 address
  (and ARP for it) and nothing addressed to 127.0.0.0/8, before the host stack or the bridge sees it.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from micropod import proc
from micropod.net.config import NetworkConfig
from micropod.net.ports import PortMapping

TABLE = "micropod"
LOOPBACK = {"prefix": {"addr": "127.0.0.0", "len": 8}}
Json = dict[str, Any]


@dataclass(frozen=True)
class VmNetwork:
    vm_id: str
    tap: str
    mac: str
    ip: ipaddress.IPv4Address
    ports: tuple[PortMapping, ...] = ()
    network: NetworkConfig = field(default_factory=NetworkConfig)


def _match(left: Json | str, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _rule(family: str, chain: str, *expr: Json) -> Json:
    return {"add": {"rule": {"family": family, "table": TABLE, "chain": chain, "expr": list(expr)}}}


def _chain(family: str, name: str, hook: str, priority: int, kind: str = "filter", policy: str = "accept",
           device: str | None = None) -> Json:
    chain: Json = {"family": family, "table": TABLE, "name": name, "type": kind, "hook": hook,
                   "prio": priority, "policy": policy}
    if device is not None:
        chain["dev"] = device
    return {"add": {"chain": chain}}


def _replace_table(family: str) -> list[Json]:
    # "add" first so that "delete" never fails on a missing table: the pair empties it atomically.
    table = {"family": family, "name": TABLE}
    return [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]


def _dnat_rules(vm: VmNetwork, chain: str) -> list[Json]:
    rules = []
    for port in vm.ports:
        if chain == "prerouting" and port.host_ip and ipaddress.IPv4Address(port.host_ip).is_loopback:
            # A port published on 127.0.0.1 is the host's alone: in prerouting, a neighbour that sends
            # to 127.0.0.1 with our MAC would be let in before the kernel could call it a martian.
            continue
        destination = (_match(_payload("ip", "daddr"), port.host_ip) if port.host_ip
                       else _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local"))
        rules.append(_rule("inet", chain, destination,
                           _match(_payload(port.protocol, "dport"), port.host_port),
                           {"dnat": {"family": "ip", "addr": str(vm.ip), "port": port.guest_port}}))
    return rules


def _antispoof(vm: VmNetwork) -> list[Json]:
    chain = f"ingress-{vm.tap}"
    drop = {"drop": None}
    counter = {"counter": None}
    return [
        _chain("netdev", chain, "ingress", -500, device=vm.tap, policy="drop"),
        _rule("netdev", chain, _match(_payload("ether", "saddr"), vm.mac, "!="), counter, drop),
        _rule("netdev", chain, _match(_payload("ether", "type"), "ip"),
              _match(_payload("ip", "saddr"), str(vm.ip), "!="), counter, drop),
        # route_localnet on the bridge (for -p via the host's localhost) would otherwise let a guest
        # that routes 127.0.0.0/8 to its gateway reach the host's loopback-only services.
        _rule("netdev", chain, _match(_payload("ether", "type"), "ip"),
              _match(_payload("ip", "daddr"), LOOPBACK), counter, drop),
        _rule("netdev", chain, _match(_payload("ether", "type"), "ip"), {"accept": None}),
        _rule("netdev", chain, _match(_payload("ether", "type"), "arp"),
              _match(_payload("arp", "saddr ether"), vm.mac, "!="), counter, drop),
        _rule("netdev", chain, _match(_payload("ether", "type"), "arp"),
              _match(_payload("arp", "saddr ip"), str(vm.ip), "!="), counter, drop),
        _rule("netdev", chain, _match(_payload("ether", "type"), "arp"), {"accept": None}),
        # Anything else (IPv6 included: VMs get no IPv6 address) meets the chain's drop policy.
        _rule("netdev", chain, counter),
    ]


def _masquerade(network: NetworkConfig) -> list[Json]:
    subnet = {"prefix": {"addr": str(network.subnet.network_address), "len": network.subnet.prefixlen}}
    return [
        # egress: the VMs' subnet leaves through the host's address
        _rule("inet", "postrouting", _match(_payload("ip", "saddr"), subnet),
              _match(_meta("oifname"), network.bridge, "!="), {"masquerade": None}),
        # hairpin: a VM reaching another (or itself) through a published port; without this the
        # answer would go straight back over the bridge, past conntrack, when br_netfilter is off
        _rule("inet", "postrouting", _match(_payload("ip", "saddr"), subnet),
              _match(_meta("oifname"), network.bridge), _match({"ct": {"key": "status"}}, "dnat", "in"),
              {"masquerade": None}),
        # the host's own localhost connections DNATed to a VM must not reach it from 127.0.0.1
        _rule("inet", "postrouting", _match(_payload("ip", "saddr"), LOOPBACK),
              _match(_meta("oifname"), network.bridge), {"masquerade": None}),
    ]


def ruleset(vms: list[VmNetwork]) -> Json:
    """The complete desired state as an nft JSON batch; each VM's network gets its NAT rules."""
    commands: list[Json] = [{"metainfo": {"json_schema_version": 1}}]
    commands += _replace_table("inet")
    commands += [
        _chain("inet", "prerouting", "prerouting", -100, kind="nat"),
        _chain("inet", "output", "output", -100, kind="nat"),
        _chain("inet", "postrouting", "postrouting", 100, kind="nat"),
    ]
    for network in dict.fromkeys(vm.network for vm in vms):
        commands += _masquerade(network)
    for vm in vms:
        commands += _dnat_rules(vm, "prerouting")
        commands += _dnat_rules(vm, "output")
    commands += _replace_table("netdev")
    for vm in vms:
        commands += _antispoof(vm)
    return {"nftables": commands}


def apply(batch: Json) -> None:
    """One transaction: either all of it takes effect or none."""
    proc.run(["nft", "-j", "-f", "-"], input=json.dumps(batch).encode())


def remove() -> None:
    """Delete both tables; nothing of micropod's stays in the firewall."""
    empty = [{"add": {"table": {"family": f, "name": TABLE}}} for f in ("inet", "netdev")]
    empty += [{"delete": {"table": {"family": f, "name": TABLE}}} for f in ("inet", "netdev")]
    apply({"nftables": [{"metainfo": {"json_schema_version": 1}}, *empty]})


def forward_blockers() -> list[str]:
    """Other tables' forward chains whose policy is drop: they drop the VMs' forwarded traffic too,
    whatever micropod's own rules say (a docker host's iptables FORWARD chain, for one)."""
    out = proc.run(["nft", "-j", "list", "chains"], check=False)
    if out.returncode != 0:
        return []
    chains = [item["chain"] for item in json.loads(out.stdout).get("nftables", []) if "chain" in item]
    return [f"{c['family']} {c['table']} {c['name']}" for c in chains
            if c.get("hook") == "forward" and c.get("policy") == "drop" and c.get("table") != TABLE]


def listing(family: str) -> Json:
    out = proc.run(["nft", "-j", "list", "table", family, TABLE], check=False)
    if out.returncode != 0:
        return {"nftables": []}
    result: Json = json.loads(out.stdout)
    return result
