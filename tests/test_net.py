"""Networking pieces without a namespace: config, names, port specs, and the ruleset as data."""

from __future__ import annotations

import ipaddress
import socket

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


def test_ruleset_is_two_wholesale_tables_with_per_vm_rules() -> None:
    vm = VmNetwork("v1", "mp-v1", "02:00:00:00:00:02", ipaddress.IPv4Address("10.88.0.2"),
                   (PortMapping(8080, 80),))
    commands = ruleset([vm])["nftables"]
    tables = [c for c in commands if "table" in next(iter(c.values()), {})]
    # each table: add (so delete cannot fail), delete, add: an atomic replace
    assert [next(iter(c)) for c in tables] == ["add", "delete", "add"] * 2
    text = str(commands)
    assert "'masquerade': None" in text and "'dnat'" in text and "'dev': 'mp-v1'" in text
    assert ruleset([]) != ruleset([vm])
    assert "mp-v1" not in str(ruleset([]))


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
    commands = ruleset([vm])["nftables"]
    prerouting, output = _chain_rules(commands, "prerouting"), _chain_rules(commands, "output")
    assert len(output) == 2 and len(prerouting) == 1 and "8081" in prerouting[0]


def test_each_network_gets_its_nat_and_guests_cannot_reach_host_loopback() -> None:
    other = NetworkConfig.parse("mp1", "10.99.0.0/24")
    one = VmNetwork("v1", "mp-v1", "02:00:00:00:00:02", ipaddress.IPv4Address("10.88.0.2"))
    two = VmNetwork("v2", "mp-v2", "02:00:00:00:00:03", ipaddress.IPv4Address("10.99.0.2"), (), other)
    commands = ruleset([one, two])["nftables"]
    postrouting = _chain_rules(commands, "postrouting")
    assert sum("10.88.0.0" in r for r in postrouting) == 2 and sum("10.99.0.0" in r for r in postrouting) == 2
    assert sum("'dnat'" in r and "ct" in r for r in postrouting) == 2  # hairpin, per network
    for tap in ("mp-v1", "mp-v2"):
        ingress = _chain_rules(commands, f"ingress-{tap}")
        assert any("daddr" in r and "127.0.0.0" in r and "drop" in r for r in ingress)
