"""The agent's rtnetlink client, against a real kernel in a network namespace the test creates."""

from __future__ import annotations

import json
import subprocess

import pytest

from micropod.agent import netconf
from micropod.netlink import mac_bytes
from tests.netns import in_fresh_netns


def _configure_veth() -> dict[str, object]:
    subprocess.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"], check=True)
    subprocess.run(["ip", "link", "set", "peer0", "up"], check=True)
    netconf.configure_from({"ifname": "eth0", "mac": "02:12:34:56:78:9a", "address": "10.88.0.7/16",
                            "gateway": "10.88.0.1"})
    netconf.configure_from({"ifname": "eth0", "mac": "02:12:34:56:78:9a", "address": "10.88.0.7/16",
                            "gateway": "10.88.0.1"})  # idempotent: a restart of the agent may redo it
    link = json.loads(subprocess.run(["ip", "-j", "addr", "show", "eth0"], capture_output=True, text=True,
                                     check=True).stdout)[0]
    routes = json.loads(subprocess.run(["ip", "-j", "route"], capture_output=True, text=True, check=True).stdout)
    return {"mac": link["address"], "up": "UP" in link["flags"],
            "addrs": [f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if a["family"] == "inet"],
            "default": [r.get("gateway") for r in routes if r["dst"] == "default"]}


def test_configures_mac_address_link_and_default_route() -> None:
    seen = in_fresh_netns(_configure_veth)
    assert seen == {"mac": "02:12:34:56:78:9a", "up": True, "addrs": ["10.88.0.7/16"], "default": ["10.88.0.1"]}


def _missing() -> str:
    try:
        netconf.configure_from({"ifname": "eth9", "mac": "02:00:00:00:00:01", "address": "10.0.0.2/24"})
    except netconf.NetconfError as exc:
        return str(exc)
    return "configured"


def test_a_missing_interface_is_a_clear_error() -> None:
    assert in_fresh_netns(_missing) == "no network interface 'eth9'"


def _unreachable_gateway() -> str:
    subprocess.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"], check=True)
    try:
        netconf.configure("eth0", "02:00:00:00:00:01", "10.0.0.2", 24, "192.168.1.1")
    except netconf.NetconfError as exc:
        return str(exc)
    return "configured"


def test_netlink_errors_carry_the_errno() -> None:
    message = in_fresh_netns(_unreachable_gateway)
    assert message == "configuring eth0 as 10.0.0.2/24: Network is unreachable"


@pytest.mark.parametrize("text", ["02:00:00:00:00:01", "02-00-00-00-00-01"])
def test_mac_bytes(text: str) -> None:
    assert mac_bytes(text.replace("-", ":")) == bytes([2, 0, 0, 0, 0, 1])
