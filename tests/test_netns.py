"""Real bridge, TAP and nftables work inside network namespaces the tests create."""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import select
import socket
import struct
import subprocess
from pathlib import Path

from micropod.net import links, nft
from micropod.net.config import NetworkConfig
from micropod.net.nft import VmNetwork
from micropod.net.ports import PortMapping
from tests.netns import in_fresh_netns

NET = NetworkConfig.parse("mptest0", "10.77.0.0/24")
VM = VmNetwork("vm1", "mp-vm1", "02:aa:bb:cc:dd:01", ipaddress.IPv4Address("10.77.0.2"), (PortMapping(8080, 80),),
               NET)
VM2 = VmNetwork("vm2", "mp-vm2", "02:aa:bb:cc:dd:02", ipaddress.IPv4Address("10.77.0.3"),
                (PortMapping(53, 53, "udp"),), NET)


def _links() -> list[str]:
    return json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True).stdout)


TABLE = "micropod-test"


def _setup(*vms: VmNetwork) -> None:
    links.ensure_owned_bridge(NET, "micropod 000000000000 /test")
    for vm in vms:
        links.create_tap(vm.tap, NET.bridge)
    nft.apply(nft.ruleset(list(vms), TABLE))


def _setup_and_teardown() -> dict[str, object]:
    _setup(VM, VM2)
    seen = {"links": [link["ifname"] for link in _links()],
            "inet": json.dumps(nft.listing("inet", TABLE)), "netdev": json.dumps(nft.listing("netdev", TABLE)),
            "forward": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()}
    # vm1 goes: its TAP and every rule that names it; vm2 stays
    links.delete_tap(VM.tap)
    nft.apply(nft.ruleset([VM2], TABLE))
    seen["after_links"] = [link["ifname"] for link in _links()]
    seen["after_inet"] = json.dumps(nft.listing("inet", TABLE))
    seen["after_netdev"] = json.dumps(nft.listing("netdev", TABLE))
    links.delete_tap(VM.tap)  # idempotent
    links.delete_tap(VM2.tap)
    nft.remove(TABLE)
    nft.remove(TABLE)
    seen["final_inet"] = nft.listing("inet", TABLE)["nftables"]
    seen["final_links"] = [link["ifname"] for link in _links()]
    return seen


def test_setup_and_exact_teardown() -> None:
    seen = in_fresh_netns(_setup_and_teardown)
    assert {"mptest0", "mp-vm1", "mp-vm2"} <= set(seen["links"])
    assert seen["forward"] == "1"
    assert "10.77.0.2" in seen["inet"] and '"port": 80' in seen["inet"] and "masquerade" in seen["inet"]
    assert "ingress-mp-vm1" in seen["netdev"] and "02:aa:bb:cc:dd:01" in seen["netdev"]
    assert "mp-vm1" not in seen["after_links"] and "mp-vm2" in seen["after_links"]
    assert "10.77.0.2" not in seen["after_inet"] and "10.77.0.3" in seen["after_inet"]
    assert "mp-vm1" not in seen["after_netdev"] and "mp-vm2" in seen["after_netdev"]
    assert seen["final_inet"] == []
    assert "mp-vm2" not in seen["final_links"]


def _collisions() -> list[str]:
    errors = []
    subprocess.run(["ip", "link", "add", "vx0", "type", "veth", "peer", "name", "vx1"], check=True)
    subprocess.run(["ip", "addr", "add", "10.77.0.200/24", "dev", "vx0"], check=True)
    for net in (NET, NetworkConfig.parse("vx0", "10.99.0.0/24")):
        try:
            links.ensure_owned_bridge(net, "")
        except Exception as exc:
            errors.append(str(exc))
    return errors


def test_a_colliding_subnet_or_bridge_name_is_refused() -> None:
    subnet_error, bridge_error = in_fresh_netns(_collisions)
    assert "collides with 10.77.0.200/24 on vx0" in subnet_error
    assert "vx0 exists and is not a bridge" in bridge_error


TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


def _arp_request(src_mac: str, src_ip: str, target_ip: str) -> bytes:
    mac = bytes.fromhex(src_mac.replace(":", ""))
    ether = b"\xff" * 6 + mac + b"\x08\x06"
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ipaddress.IPv4Address(src_ip).packed,
                      b"\0" * 6, ipaddress.IPv4Address(target_ip).packed)
    return ether + arp


def _arp_reply(fd: int, ip: str, timeout: float) -> bytes | None:
    """The host's ARP answer to ``ip`` on the TAP within ``timeout``: the answering MAC, or None."""
    while select.select([fd], [], [], timeout)[0]:
        frame = os.read(fd, 2048)
        if frame[12:14] == b"\x08\x06" and struct.unpack("!H", frame[20:22])[0] == 2:
            return frame[22:28] if frame[38:42] == ipaddress.IPv4Address(ip).packed else None
    return None


def _arp_reply_for(fd: int, ip: str, timeout: float) -> bool:
    return _arp_reply(fd, ip, timeout) is not None


def _vm_tap() -> tuple[int, bytes]:
    """The VM's side of its TAP, once the host answers its honest ARP: (fd, the bridge's MAC or b"").

    The bridge port turns forwarding only after the TAP's carrier comes up (when we opened it), so
    resend like a guest's ARP would, within a bound.
    """
    _setup(VM)
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", VM.tap.encode(), IFF_TAP | IFF_NO_PI))
    for _ in range(20):
        os.write(fd, _arp_request(VM.mac, str(VM.ip), str(NET.gateway)))
        bridge_mac = _arp_reply(fd, str(VM.ip), 0.5)
        if bridge_mac:
            return fd, bridge_mac
    return fd, b""


def _spoofing() -> dict[str, object]:
    fd, bridge_mac = _vm_tap()
    gateway = str(NET.gateway)
    honest = bool(bridge_mac)  # the VM as it is: the host answers
    # Another VM's IP, or another MAC: dropped at the TAP's ingress, so no answer.
    os.write(fd, _arp_request(VM.mac, "10.77.0.99", gateway))
    spoofed_ip = _arp_reply_for(fd, "10.77.0.99", 1.0)
    os.write(fd, _arp_request("02:66:66:66:66:66", str(VM.ip), gateway))
    spoofed_mac = _arp_reply_for(fd, str(VM.ip), 1.0)
    os.close(fd)
    counters = [r["rule"]["expr"] for r in nft.listing("netdev", TABLE)["nftables"] if "rule" in r]
    dropped = sum(e["counter"]["packets"] for expr in counters for e in expr if "counter" in e and
                  any("drop" in x for x in expr))
    return {"honest": honest, "spoofed_ip": spoofed_ip, "spoofed_mac": spoofed_mac, "dropped": dropped}


def test_anti_spoofing_drops_frames_that_are_not_the_vms_own() -> None:
    seen = in_fresh_netns(_spoofing)
    assert seen["honest"], "the host did not answer the VM's own ARP request"
    assert not seen["spoofed_ip"], "an ARP request with another IP got through"
    assert not seen["spoofed_mac"], "a frame with another MAC got through"
    assert seen["dropped"] >= 2


def test_nft_rejects_a_broken_batch_as_a_whole() -> None:
    def body() -> str:
        _setup(VM)
        batch = nft.ruleset([VM2], TABLE)
        batch["nftables"].append({"add": {"rule": {"family": "inet", "table": TABLE, "chain": "missing",
                                                   "expr": [{"accept": None}]}}})
        try:
            nft.apply(batch)
        except Exception as exc:
            return f"refused: {exc}" + json.dumps(nft.listing("netdev", TABLE))
        return "applied"

    result = in_fresh_netns(body)
    assert result.startswith("refused") and "mp-vm1" in result  # the old ruleset is intact


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _echo_request(src_mac: bytes, dst_mac: bytes, src_ip: str, dst_ip: str, ident: int) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"micropod"
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), ident, 0, 64, 1, 0,
                     ipaddress.IPv4Address(src_ip).packed, ipaddress.IPv4Address(dst_ip).packed)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + icmp


def _echo_reply_for(fd: int, ident: int, timeout: float) -> bool:
    while select.select([fd], [], [], timeout)[0]:
        frame = os.read(fd, 2048)
        is_icmp_echo_reply = frame[12:14] == b"\x08\x00" and frame[23] == 1 and frame[34] == 0
        if is_icmp_echo_reply and frame[38:40] == struct.pack("!H", ident):
            return True
    return False


def _answer_one_ping(fd: int, timeout: float) -> bool:
    """Play the guest: answer the first echo request to the VM's address that reaches the TAP."""
    while select.select([fd], [], [], timeout)[0]:
        frame = os.read(fd, 2048)
        if frame[12:14] == b"\x08\x00" and frame[23] == 1 and frame[34] == 8 and frame[30:34] == VM.ip.packed:
            ip = frame[14:22] + b"\x40\x01\0\0" + frame[30:34] + frame[26:30]
            ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
            icmp = b"\0\0\0\0" + frame[38:]
            icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
            os.write(fd, frame[6:12] + frame[0:6] + b"\x08\x00" + ip + icmp)
            return True
    return False


def _raw_echo_reply_for(raw: socket.socket, ident: int, timeout: float) -> bool:
    while select.select([raw], [], [], timeout)[0]:
        packet = raw.recv(2048)
        if packet[20] == 0 and packet[24:26] == struct.pack("!H", ident):
            return True
    return False


def _counted(family: str, needle: str) -> int:
    rules = [r["rule"]["expr"] for r in nft.listing(family, TABLE)["nftables"] if "rule" in r]
    return sum(e["counter"]["packets"] for expr in rules for e in expr if "counter" in e and needle in json.dumps(expr))


def _pings_from_the_vm() -> dict[str, object]:
    # the uplink: an address of the host's on another interface, which the guest could route to
    subprocess.run(["ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1"], check=True)
    subprocess.run(["ip", "addr", "add", "192.0.2.1/24", "dev", "up0"], check=True)
    subprocess.run(["ip", "link", "set", "up0", "up"], check=True)
    fd, bridge_mac = _vm_tap()
    mac = bytes.fromhex(VM.mac.replace(":", ""))
    answered = {}
    for ident, target in enumerate((str(NET.gateway), "192.0.2.1", "127.0.0.1", "169.254.169.254"), 0x1111):
        os.write(fd, _echo_request(mac, bridge_mac, str(VM.ip), target, ident))
        answered[target] = _echo_reply_for(fd, ident, 2.0)
    # the host's own ping to the VM: its answer comes back in, as the reply of the host's connection
    subprocess.run(["ip", "neigh", "replace", str(VM.ip), "lladdr", VM.mac, "dev", NET.bridge], check=True)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as raw:
        raw.sendto(_echo_request(b"", b"", "0.0.0.0", "0.0.0.0", 0x3333)[22:], (str(VM.ip), 0))
        guest_answered = _answer_one_ping(fd, 5.0)
        host_ping = _raw_echo_reply_for(raw, 0x3333, 5.0)
    os.close(fd)
    return {"bridge_mac": bool(bridge_mac), "answered": answered, "guest_answered": guest_answered,
            "host_ping": host_ping, "to_host": _counted("inet", '"drop"'),
            "to_loopback": _counted("netdev", "127.0.0.0"), "to_link_local": _counted("netdev", "169.254.0.0")}


def test_a_guest_cannot_reach_the_host_but_the_host_reaches_it() -> None:
    # route_localnet is on for the bridge (-p through the host's localhost); without the ingress rule
    # the host would answer a guest that sends to 127.0.0.1 via its gateway's MAC
    seen = in_fresh_netns(_pings_from_the_vm)
    assert seen["bridge_mac"], "the host did not answer the VM's own ARP request"
    assert not any(seen["answered"].values()), seen  # type: ignore[attr-defined]
    assert seen["to_host"] == 2 and seen["to_loopback"] == 1 and seen["to_link_local"] == 1, seen
    assert seen["guest_answered"] and seen["host_ping"], seen


def _blockers() -> tuple[list[str], list[str]]:
    before = nft.forward_blockers()
    _setup(VM)  # micropod's own table does not count
    subprocess.run(["nft", "add table ip filter; add chain ip filter FORWARD "
                    "{ type filter hook forward priority 0; policy drop; }"], check=True)
    return before, nft.forward_blockers()


def test_doctor_sees_forward_chains_that_drop() -> None:
    assert in_fresh_netns(_blockers) == ([], ["ip filter FORWARD"])
