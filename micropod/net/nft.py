"""micropod's whole nftables state, built as data and applied in one atomic `nft -j -f` transaction.

Two tables, each replaced wholesale from the list of VMs on every change, so that applying is
idempotent and teardown is exact (a VM's rules disappear with the VM from the list):

- ``inet micropod``: masquerade for egress from the subnet, DNAT for published ports (from other
  hosts in prerouting, from the host itself through localhost in output), and masquerade of the
  127.0.0.1-sourced connections that DNAT sends to the bridge.
- ``netdev micropod``: an ingress chain per TAP that admits only the VM's own MAC and IPv4 address
  (and ARP for it), before the host stack or the bridge sees a frame.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from micropod import proc
from micropod.net.config import NetworkConfig
from micropod.net.ports import PortMapping

TABLE = "micropod"
Json = dict[str, Any]


@dataclass(frozen=True)
class VmNetwork:
    vm_id: str
    tap: str
    mac: str
    ip: ipaddress.IPv4Address
    ports: tuple[PortMapping, ...] = ()


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
        _rule("netdev", chain, _match(_payload("ether", "type"), "ip"), {"accept": None}),
        _rule("netdev", chain, _match(_payload("ether", "type"), "arp"),
              _match(_payload("arp", "saddr ether"), vm.mac, "!="), counter, drop),
        _rule("netdev", chain, _match(_payload("ether", "type"), "arp"),
              _match(_payload("arp", "saddr ip"), str(vm.ip), "!="), counter, drop),
        _rule("netdev", chain, _match(_payload("ether", "type"), "arp"), {"accept": None}),
        # Anything else (IPv6 included: VMs get no IPv6 address) meets the chain's drop policy.
        _rule("netdev", chain, counter),
    ]


def ruleset(network: NetworkConfig, vms: list[VmNetwork]) -> Json:
    """The complete desired state as an nft JSON batch."""
    subnet = {"prefix": {"addr": str(network.subnet.network_address), "len": network.subnet.prefixlen}}
    commands: list[Json] = [{"metainfo": {"json_schema_version": 1}}]
    commands += _replace_table("inet")
    commands += [
        _chain("inet", "prerouting", "prerouting", -100, kind="nat"),
        _chain("inet", "output", "output", -100, kind="nat"),
        _chain("inet", "postrouting", "postrouting", 100, kind="nat"),
        _rule("inet", "postrouting", _match(_payload("ip", "saddr"), subnet),
              _match(_meta("oifname"), network.bridge, "!="), {"masquerade": None}),
        _rule("inet", "postrouting", _match(_payload("ip", "saddr"), {"prefix": {"addr": "127.0.0.0", "len": 8}}),
              _match(_meta("oifname"), network.bridge), {"masquerade": None}),
    ]
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


def listing(family: str) -> Json:
    out = proc.run(["nft", "-j", "list", "table", family, TABLE], check=False)
    if out.returncode != 0:
        return {"nftables": []}
    result: Json = json.loads(out.stdout)
    return result
