"""Networking pieces without a namespace: config, names, port specs, and the ruleset as data."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

from micropod.errors import ConflictError, UsageError
from micropod.net.addressing import mac_for, tap_name
from micropod.net.config import NetworkConfig
from micropod.net.nft import VmNetwork, ruleset
from micropod.net.ports import PortMapping, check_host_port_free, check_unique, parse_publish


def test_config_defaults_and_validation() -> None:
    net = NetworkConfig()
    assert (net.bridge, str(net.subnet), str(net.gateway)) == ("micropod0", "10.88.0.0/16", "10.88.0.1")
    assert str(NetworkConfig.parse("br-x", "192.168.77.0/24").gateway_interface) == "192.168.77.1/24"
    for bridge, subnet in (("", "10.0.0.0/24"), ("x" * 16, "10.0.0.0/24"), ("a/b", "10.0.0.0/24"),
                           ("ok", "10.0.0.1/24"), ("ok", "nope"), ("ok", "10.0.0.0/31")):
        with pytest.raises(UsageError):
            NetworkConfig.parse(bridge, subnet)


def test_mac_and_tap_names_are_deterministic_and_valid() -> None:
    vm = "ab" * 32
    assert mac_for(vm) == mac_for(vm) != mac_for("cd" * 32)
    first = int(mac_for(vm).split(":")[0], 16)
    assert first & 0b10 and not first & 0b1  # locally administered, unicast
    assert tap_name(vm) == "mp-abababababab" and len(tap_name(vm)) <= 15


@pytest.mark.parametrize("spec,mapping", [
    ("8080:80", PortMapping(8080, 80)),
    ("53:53/udp", PortMapping(53, 53, "udp")),
    ("127.0.0.1:8443:443/tcp", PortMapping(8443, 443, "tcp", "127.0.0.1")),
])
def test_publish_specs(spec: str, mapping: PortMapping) -> None:
    assert parse_publish(spec) == mapping


@pytest.mark.parametrize("spec", ["80", "0:80", "70000:80", "a:b", "80:80/sctp", "1.2.3:80:80", "1:2:3:4"])
def test_bad_publish_specs(spec: str) -> None:
    with pytest.raises(UsageError, match="invalid port spec"):
        parse_publish(spec)


def test_a_port_published_twice_or_in_use_is_refused() -> None:
    with pytest.raises(ConflictError, match="already published"):
        check_unique([PortMapping(8080, 80)], [PortMapping(8080, 81)])
    check_unique([PortMapping(8080, 80, "udp")], [PortMapping(8080, 80)])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConflictError, match="in use on the host"):
            check_host_port_free(PortMapping(port, 80, host_ip="127.0.0.1"))


T = "micropod-0123456789ab"


def test_ruleset_is_three_wholesale_tables_of_one_root_with_per_vm_rules() -> None:
    vm = VmNetwork("v1", "mp-v1", "02:00:00:00:00:02", ipaddress.IPv4Address("10.88.0.2"),
                   (PortMapping(8080, 80),))
    commands = ruleset([vm], T)["nftables"]
    tables = [c for c in commands if "table" in next(iter(c.values()), {})]
    # each table: add (so delete cannot fail), delete, add: an atomic replace
    assert [next(iter(c)) for c in tables] == ["add", "delete", "add"] * 3
    assert {c[next(iter(c))]["table"]["name"] for c in tables} == {T}
    assert {c["add"]["rule"]["table"] for c in commands if "rule" in c.get("add", {})} == {T}
    text = str(commands)
    assert "'masquerade': None" in text and "'dnat'" in text and "'dev': 'mp-v1'" in text
    assert ruleset([], T) != ruleset([vm], T)
    assert "mp-v1" not in str(ruleset([], T))


def test_ports_on_different_host_addresses_do_not_clash() -> None:
    check_unique([PortMapping(80, 80, host_ip="127.0.0.1")], [PortMapping(80, 80, host_ip="192.0.2.1")])
    with pytest.raises(ConflictError, match="already published"):
        check_unique([PortMapping(80, 80, host_ip="127.0.0.1")], [PortMapping(80, 81)])  # all addresses
    with pytest.raises(ConflictError, match="already published"):
        check_unique([PortMapping(80, 80), PortMapping(80, 81, host_ip="10.0.0.1")], [])


def _chain_rules(commands: list[dict[str, object]], chain: str) -> list[str]:
    return [str(c["add"]["rule"]["expr"]) for c in commands  # type: ignore[index]
            if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain]  # type: ignore[attr-defined,index]


def test_a_port_published_on_loopback_is_the_hosts_alone() -> None:
    vm = VmNetwork("v1", "mp-v1", "02:00:00:00:00:02", ipaddress.IPv4Address("10.88.0.2"),
                   (PortMapping(8080, 80, host_ip="127.0.0.1"), PortMapping(8081, 81)))
    commands = ruleset([vm], T)["nftables"]
    prerouting, output = _chain_rules(commands, "prerouting"), _chain_rules(commands, "output")
    assert len(output) == 2 and len(prerouting) == 1 and "8081" in prerouting[0]


def test_each_network_gets_its_nat_and_guests_cannot_reach_host_loopback() -> None:
    other = NetworkConfig.parse("mp1", "10.99.0.0/24")
    one = VmNetwork("v1", "mp-v1", "02:00:00:00:00:02", ipaddress.IPv4Address("10.88.0.2"))
    two = VmNetwork("v2", "mp-v2", "02:00:00:00:00:03", ipaddress.IPv4Address("10.99.0.2"), (), other)
    commands = ruleset([one, two], T)["nftables"]
    postrouting = _chain_rules(commands, "postrouting")
    assert sum("10.88.0.0" in r for r in postrouting) == 2 and sum("10.99.0.0" in r for r in postrouting) == 2
    assert sum("'dnat'" in r and "ct" in r for r in postrouting) == 2  # hairpin, per network
    for tap in ("mp-v1", "mp-v2"):
        ingress = _chain_rules(commands, f"ingress-{tap}")
        assert any("daddr" in r and "127.0.0.0" in r and "drop" in r for r in ingress)


def test_guests_may_not_reach_the_host_or_link_local_addresses() -> None:
    vm = VmNetwork("v1", "mp-v1", "02:00:00:00:00:02", ipaddress.IPv4Address("10.88.0.2"))
    commands = ruleset([vm], T)["nftables"]
    guard = _chain_rules(commands, "input")
    # replies to the host's own connections, then DNATed ones, then a drop of the rest from the bridge
    assert len(guard) == 3 and all("'iifname'}}, 'right': 'micropod0'" in r for r in guard), guard
    assert "established" in guard[0] and "related" in guard[0] and "accept" in guard[0]
    assert "'dnat'" in guard[1] and "accept" in guard[1] and "drop" in guard[2]
    hooks = {c["add"]["chain"]["name"]: c["add"]["chain"] for c in commands if "chain" in c.get("add", {})}
    assert hooks["input"]["hook"] == "input" and hooks["input"]["family"] == "inet"
    ingress = _chain_rules(commands, "ingress-mp-v1")
    link_local = [r for r in ingress if "169.254.0.0" in r]
    assert len(link_local) == 1 and "'daddr'" in link_local[0] and "drop" in link_local[0]
    assert ingress.index(link_local[0]) < next(i for i, r in enumerate(ingress) if r.endswith("{'accept': None}]"))


def test_icc_off_isolates_a_vm_from_the_others_bridged_or_routed() -> None:
    open_vm = VmNetwork("v1", "mp-v1", "02:00:00:00:00:02", ipaddress.IPv4Address("10.88.0.2"))
    loner = VmNetwork("v2", "mp-v2", "02:00:00:00:00:03", ipaddress.IPv4Address("10.88.0.3"), icc=False)
    everyone = ruleset([open_vm], T)["nftables"]
    assert not any("drop" in r for r in _chain_rules(everyone, "forward"))  # the default: VMs reach each other
    assert not [c for c in everyone if c.get("add", {}).get("rule", {}).get("family") == "bridge"]
    commands = ruleset([open_vm, loner], T)["nftables"]
    bridged = [str(c["add"]["rule"]["expr"]) for c in commands if "rule" in c.get("add", {})
               and c["add"]["rule"]["family"] == "bridge"]
    assert len(bridged) == 2 and all("mp-v2" in r and "drop" in r for r in bridged)
    assert not any("mp-v1" in r for r in bridged)
    routed = [r for r in _chain_rules(commands, "forward") if "10.88.0.3" in r]
    assert len(routed) == 2 and all("drop" in r for r in routed)
    forward = _chain_rules(commands, "forward")
    assert "'dnat'" in forward[0] and "accept" in forward[0]  # published ports still pass, hairpin too


def test_micropod_icc_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from micropod.net.config import icc_from_env

    assert icc_from_env() is True
    monkeypatch.setenv("MICROPOD_ICC", "0")
    assert icc_from_env() is False
    monkeypatch.setenv("MICROPOD_ICC", "off")
    with pytest.raises(UsageError, match="invalid MICROPOD_ICC"):
        icc_from_env()


def test_a_root_is_one_owner_however_it_is_spelled(tmp_path: Path) -> None:
    from micropod.net.owner import Owner, recorded_owner

    (tmp_path / "root").mkdir()
    one, two = Owner.of(tmp_path / "root"), Owner.of(tmp_path / "x" / ".." / "root")
    assert one == two and one.table == two.table and one.table.startswith("micropod-") and len(one.table) == 21
    assert Owner.of(tmp_path).table != one.table
    assert recorded_owner(one.alias) == (one.tag, str(tmp_path / "root"))
    assert recorded_owner("") is None and recorded_owner("someone else's bridge") is None


def test_resolvers_on_the_hosts_own_addresses_are_not_given_to_guests(tmp_path: Path) -> None:
    from micropod.net.dns import resolv_conf

    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.168.1.10\nnameserver 10.1.2.3\n")
    assert resolv_conf((), conf, local=frozenset({"192.168.1.10"})) == "nameserver 10.1.2.3\n"


def test_metadata_requests_are_named_by_the_tap_they_came_in_on() -> None:
    """The TAP's ingress marks the guest's requests to 169.254.169.254:80 (after its source checks), and only
    that mark, never an address, picks the server they are DNATed to; the input chain drops the rest."""
    alpha = VmNetwork("v1", "mp-v1", "02:00:00:00:00:02", ipaddress.IPv4Address("10.88.0.2"), metadata_port=40001)
    beta = VmNetwork("v2", "mp-v2", "02:00:00:00:00:03", ipaddress.IPv4Address("10.88.0.3"), metadata_port=40002)
    commands = ruleset([alpha, beta], T)["nftables"]
    for vm in (alpha, beta):
        ingress = _chain_rules(commands, f"ingress-{vm.tap}")
        marking = [r for r in ingress if "'mangle'" in r]
        assert len(marking) == 1 and f"'value': {int(vm.ip)}" in marking[0] and "169.254.169.254" in marking[0]
        source_check = next(i for i, r in enumerate(ingress) if "'saddr'" in r and str(vm.ip) in r)
        link_local_drop = next(i for i, r in enumerate(ingress) if "169.254.0.0" in r)
        assert source_check < ingress.index(marking[0]) < link_local_drop
    dnat = [r for r in _chain_rules(commands, "prerouting") if "169.254.169.254" in r]
    assert len(dnat) == 2
    for vm, rule in zip((alpha, beta), dnat, strict=True):
        assert f"'right': {vm.mark}" in rule and f"'port': {vm.metadata_port}" in rule and "'saddr'" not in rule
    drops = [r for r in _chain_rules(commands, "input") if "40001" in r or "40002" in r]
    assert len(drops) == 2 and all("'op': '!='" in r and "drop" in r for r in drops)
    # a VM without a metadata server (Firecracker serves MMDS itself) gets none of it
    plain = ruleset([VmNetwork("v3", "mp-v3", "02:00:00:00:00:04", ipaddress.IPv4Address("10.88.0.4"))], T)
    assert "mangle" not in str(plain)
