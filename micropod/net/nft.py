"""One state root's nftables state, built as data and applied in one atomic `nft -j -f` transaction.

Each state root owns three tables named after it (``micropod-<root tag>``, see ``owner``), each replaced
wholesale from that root's VMs on every change, so that applying is idempotent, teardown is exact (a
VM's rules disappear with the VM from the list), and no root ever rewrites or deletes another's:

- ``inet``: per network, masquerade for egress from the subnet, hairpin masquerade for VMs reaching
  published ports over the bridge, and masquerade of the 127.0.0.1-sourced connections that DNAT
  sends to the bridge. DNAT for published ports: from other hosts in prerouting (never for a port
  published on a loopback address), from the host itself through localhost in output. An input
  chain drops what the VMs send to the host itself, except replies to the host's own connections;
  a forward chain keeps VMs started with MICROPOD_ICC=0 from being routed to other VMs.
- ``netdev``: an ingress chain per TAP that admits only the VM's own MAC and IPv4 address (and ARP
  for it) and nothing addressed to 127.0.0.0/8 or 169.254.0.0/16, before the host stack or the
  bridge sees it, except the VM's requests to its metadata service (169.254.169.254:80), which it
  marks as that TAP's; prerouting DNATs those, by the mark alone, to the VM's own server.
- ``bridge``: drops frames the bridge would switch between a MICROPOD_ICC=0 VM and another VM; it
  works whether br_netfilter is loaded or not.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from micropod import proc
from micropod.metadata.tree import ADDRESS, PORT
from micropod.net.config import NetworkConfig
from micropod.net.ports import PortMapping

PREFIX = "micropod"  # every table of ours is PREFIX or starts with PREFIX-; the bare name is an old release's
FAMILIES = ("inet", "netdev", "bridge")
LOOPBACK = {"prefix": {"addr": "127.0.0.0", "len": 8}}
LINK_LOCAL = {"prefix": {"addr": "169.254.0.0", "len": 16}}
Json = dict[str, Any]


@dataclass(frozen=True)
class VmNetwork:
    vm_id: str
    tap: str
    mac: str
    ip: ipaddress.IPv4Address
    ports: tuple[PortMapping, ...] = ()
    network: NetworkConfig = field(default_factory=NetworkConfig)
    icc: bool = True  # False: no traffic with other VMs except through published ports
    rate: int = 0  # bytes per second the guest may send (QEMU's --network-rate); 0: no limit
    metadata_port: int = 0  # the VM's metadata server on the gateway (micropod/metadata/server.py); 0: none

    @property
    def mark(self) -> int:
        """What the TAP's ingress puts on the guest's metadata requests: its leased address, unique on its bridge."""
        return int(self.ip)


def _match(left: Json | str, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


COUNTER: Json = {"counter": None}
DROP: Json = {"drop": None}
ACCEPT: Json = {"accept": None}
DNATED = _match({"ct": {"key": "status"}}, "dnat", "in")


@dataclass(frozen=True)
class Ruleset:
    """Builds one table set; ``table`` is the owning root's name for all of its families."""

    table: str

    def rule(self, family: str, chain: str, *expr: Json) -> Json:
        return {"add": {"rule": {"family": family, "table": self.table, "chain": chain, "expr": list(expr)}}}

    def chain(self, family: str, name: str, hook: str, priority: int, kind: str = "filter",
              policy: str = "accept", device: str | None = None) -> Json:
        chain: Json = {"family": family, "table": self.table, "name": name, "type": kind, "hook": hook,
                       "prio": priority, "policy": policy}
        if device is not None:
            chain["dev"] = device
        return {"add": {"chain": chain}}

    def replace_table(self, family: str) -> list[Json]:
        # "add" first so that "delete" never fails on a missing table: the pair empties it atomically.
        table = {"family": family, "name": self.table}
        return [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]

    def dnat(self, vm: VmNetwork, chain: str) -> list[Json]:
        rules = []
        for port in vm.ports:
            if chain == "prerouting" and port.host_ip and ipaddress.IPv4Address(port.host_ip).is_loopback:
                # A port published on 127.0.0.1 is the host's alone: in prerouting, a neighbour that sends
                # to 127.0.0.1 with our MAC would be let in before the kernel could call it a martian.
                continue
            destination = (_match(_payload("ip", "daddr"), port.host_ip) if port.host_ip
                           else _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local"))
            rules.append(self.rule("inet", chain, destination,
                                   _match(_payload(port.protocol, "dport"), port.host_port),
                                   {"dnat": {"family": "ip", "addr": str(vm.ip), "port": port.guest_port}}))
        return rules

    def antispoof(self, vm: VmNetwork) -> list[Json]:
        chain = f"ingress-{vm.tap}"
        ip = _match(_payload("ether", "type"), "ip")
        arp = _match(_payload("ether", "type"), "arp")
        # What the guest sends beyond its rate is dropped first (the kernel here has no tc policer; its TCP backs
        # off as from any congested link), with a tenth of a second's worth of burst.
        limit = [self.rule("netdev", chain, {"limit": {"rate": vm.rate, "per": "second", "rate_unit": "bytes",
                                                       "burst": max(vm.rate // 10, 16 * 1024), "burst_unit": "bytes",
                                                       "inv": True}}, COUNTER, DROP)] if vm.rate else []
        return [
            self.chain("netdev", chain, "ingress", -500, device=vm.tap, policy="drop"),
            *limit,
            self.rule("netdev", chain, _match(_payload("ether", "saddr"), vm.mac, "!="), COUNTER, DROP),
            self.rule("netdev", chain, ip, _match(_payload("ip", "saddr"), str(vm.ip), "!="), COUNTER, DROP),
            # route_localnet on the bridge (for -p via the host's localhost) would otherwise let a guest
            # that routes 127.0.0.0/8 to its gateway reach the host's loopback-only services.
            self.rule("netdev", chain, ip, _match(_payload("ip", "daddr"), LOOPBACK), COUNTER, DROP),
            *self.metadata_mark(vm, chain, ip),
            # The cloud's metadata service (169.254.169.254) hands out the host's credentials; nothing
            # else link-local is a VM's business, bridged or routed.
            self.rule("netdev", chain, ip, _match(_payload("ip", "daddr"), LINK_LOCAL), COUNTER, DROP),
            self.rule("netdev", chain, ip, ACCEPT),
            self.rule("netdev", chain, arp, _match(_payload("arp", "saddr ether"), vm.mac, "!="), COUNTER, DROP),
            self.rule("netdev", chain, arp, _match(_payload("arp", "saddr ip"), str(vm.ip), "!="), COUNTER, DROP),
            self.rule("netdev", chain, arp, ACCEPT),
            # Anything else (IPv6 included: VMs get no IPv6 address) meets the chain's drop policy.
            self.rule("netdev", chain, COUNTER),
        ]

    def metadata_mark(self, vm: VmNetwork, chain: str, ip: Json) -> list[Json]:
        """The guest's requests to its metadata service are marked as this TAP's, whatever they say they are."""
        if not vm.metadata_port:
            return []
        return [self.rule("netdev", chain, ip, _match(_payload("ip", "daddr"), ADDRESS),
                          _match(_payload("tcp", "dport"), PORT),
                          {"mangle": {"key": _meta("mark"), "value": vm.mark}}, ACCEPT)]

    def metadata_dnat(self, vm: VmNetwork) -> list[Json]:
        """Only packets the VM's own TAP marked reach its server: the mark, not an address, names the caller."""
        if not vm.metadata_port:
            return []
        gateway = str(vm.network.gateway)
        return [self.rule("inet", "prerouting", _match(_meta("iifname"), vm.network.bridge),
                          _match(_meta("mark"), vm.mark), _match(_payload("ip", "daddr"), ADDRESS),
                          _match(_payload("tcp", "dport"), PORT),
                          {"dnat": {"family": "ip", "addr": gateway, "port": vm.metadata_port}}),
                # and nothing else reaches the server: not the host's own users over loopback, not another VM
                self.rule("inet", "input", _match(_payload("ip", "daddr"), gateway),
                          _match(_payload("tcp", "dport"), vm.metadata_port), _match(_meta("mark"), vm.mark, "!="),
                          COUNTER, DROP)]

    def masquerade(self, network: NetworkConfig) -> list[Json]:
        subnet = {"prefix": {"addr": str(network.subnet.network_address), "len": network.subnet.prefixlen}}
        return [
            # egress: the VMs' subnet leaves through the host's address
            self.rule("inet", "postrouting", _match(_payload("ip", "saddr"), subnet),
                      _match(_meta("oifname"), network.bridge, "!="), {"masquerade": None}),
            # hairpin: a VM reaching another (or itself) through a published port; without this the
            # answer would go straight back over the bridge, past conntrack, when br_netfilter is off
            self.rule("inet", "postrouting", _match(_payload("ip", "saddr"), subnet),
                      _match(_meta("oifname"), network.bridge), DNATED, {"masquerade": None}),
            # the host's own localhost connections DNATed to a VM must not reach it from 127.0.0.1
            self.rule("inet", "postrouting", _match(_payload("ip", "saddr"), LOOPBACK),
                      _match(_meta("oifname"), network.bridge), {"masquerade": None}),
        ]

    def host_guard(self, network: NetworkConfig) -> list[Json]:
        """Whatever a VM sends that the host would deliver to itself (the gateway, the uplink's address,
        any local, broadcast or multicast address) is dropped, unless it answers a connection the host
        opened. Published ports are DNATed in prerouting and so are forwarded, not delivered here."""
        bridge = _match(_meta("iifname"), network.bridge)
        return [
            self.rule("inet", "input", bridge, _match({"ct": {"key": "state"}}, ["established", "related"], "in"),
                      ACCEPT),
            self.rule("inet", "input", bridge, DNATED, ACCEPT),
            self.rule("inet", "input", bridge, COUNTER, DROP),
        ]

    def isolation(self, vm: VmNetwork) -> list[Json]:
        """A MICROPOD_ICC=0 VM and the other VMs: switched frames and routed packets both go, whether
        br_netfilter hands bridged traffic to the inet hooks or not; published ports still work."""
        routed = (_match(_meta("iifname"), vm.network.bridge), _match(_meta("oifname"), vm.network.bridge))
        return [
            self.rule("bridge", "forward", _match(_meta("iifname"), vm.tap), COUNTER, DROP),
            self.rule("bridge", "forward", _match(_meta("oifname"), vm.tap), COUNTER, DROP),
            self.rule("inet", "forward", *routed, _match(_payload("ip", "saddr"), str(vm.ip)), COUNTER, DROP),
            self.rule("inet", "forward", *routed, _match(_payload("ip", "daddr"), str(vm.ip)), COUNTER, DROP),
        ]


def ruleset(vms: list[VmNetwork], table: str = PREFIX) -> Json:
    """The complete desired state of one root as an nft JSON batch; each network gets its NAT and guard.

    Roots always pass their own table; the bare default is for benchmarks in namespaces of their own."""
    build = Ruleset(table)
    networks = list(dict.fromkeys(vm.network for vm in vms))
    commands: list[Json] = [{"metainfo": {"json_schema_version": 1}}]
    commands += build.replace_table("inet")
    commands += [
        build.chain("inet", "prerouting", "prerouting", -100, kind="nat"),
        build.chain("inet", "output", "output", -100, kind="nat"),
        build.chain("inet", "postrouting", "postrouting", 100, kind="nat"),
        build.chain("inet", "input", "input", 0),
        build.chain("inet", "forward", "forward", 0),
    ]
    for network in networks:
        commands += build.masquerade(network)
        commands += build.host_guard(network)
        # DNATed connections (published ports, hairpin included) pass before any isolation drop
        commands.append(build.rule("inet", "forward", _match(_meta("iifname"), network.bridge), DNATED, ACCEPT))
    for vm in vms:
        commands += build.metadata_dnat(vm)  # its input rule follows the networks' guards
        commands += build.dnat(vm, "prerouting")
        commands += build.dnat(vm, "output")
    commands += build.replace_table("netdev")
    for vm in vms:
        commands += build.antispoof(vm)
    commands += build.replace_table("bridge")
    commands.append(build.chain("bridge", "forward", "forward", 0))
    for vm in vms:
        if not vm.icc:
            commands += build.isolation(vm)
    return {"nftables": commands}


def apply(batch: Json) -> None:
    """One transaction: either all of it takes effect or none."""
    proc.run(["nft", "-j", "-f", "-"], input=json.dumps(batch).encode())


def remove(table: str) -> None:
    """Delete one root's tables; nothing of that root's stays in the firewall, and no one else's goes."""
    empty = [{"add": {"table": {"family": f, "name": table}}} for f in FAMILIES]
    empty += [{"delete": {"table": {"family": f, "name": table}}} for f in FAMILIES]
    apply({"nftables": [{"metainfo": {"json_schema_version": 1}}, *empty]})


def _ours(name: object) -> bool:
    return isinstance(name, str) and (name == PREFIX or name.startswith(f"{PREFIX}-"))


def _items(*argv: str) -> list[Json]:
    out = proc.run(["nft", "-j", *argv], check=False)
    if out.returncode != 0:
        return []
    items: list[Json] = json.loads(out.stdout).get("nftables", [])
    return items


def forward_blockers() -> list[str]:
    """Other tables' forward chains whose policy is drop: they drop the VMs' forwarded traffic too,
    whatever micropod's own rules say (a docker host's iptables FORWARD chain, for one)."""
    chains = [item["chain"] for item in _items("list", "chains") if "chain" in item]
    return [f"{c['family']} {c['table']} {c['name']}" for c in chains
            if c.get("hook") == "forward" and c.get("policy") == "drop" and not _ours(c.get("table"))]


def has_table(table: str) -> bool:
    """Whether a root's tables are there: they are exactly while that root has a VM attached."""
    return any(item.get("table", {}).get("name") == table for item in _items("list", "tables", "inet"))


def published_elsewhere(own: str) -> list[PortMapping]:
    """The host ports other state roots DNAT (their output chains hold every published port)."""
    found = []
    for item in _items("list", "ruleset", "inet"):
        rule = item.get("rule")
        if not rule or not _ours(rule.get("table")) or rule.get("table") == own or rule.get("chain") != "output":
            continue
        host_ip, port, protocol = None, None, None
        for expr in rule.get("expr", []):
            match = expr.get("match", {}) if isinstance(expr, dict) else {}
            left, right = match.get("left"), match.get("right")
            payload = left.get("payload", {}) if isinstance(left, dict) else {}
            if payload.get("field") == "dport" and isinstance(right, int):
                port, protocol = right, payload.get("protocol")
            elif payload.get("field") == "daddr" and isinstance(right, str):
                host_ip = right
        if port and protocol in ("tcp", "udp"):
            found.append(PortMapping(port, port, protocol, host_ip))
    return found


def listing(family: str, table: str) -> Json:
    out = proc.run(["nft", "-j", "list", "table", family, table], check=False)
    if out.returncode != 0:
        return {"nftables": []}
    result: Json = json.loads(out.stdout)
    return result
