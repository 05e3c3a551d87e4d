"""The VM's TAP inside a CNI pod's network namespace, joined to the interface CNI made there (eth0) by TC
redirects in both directions, as firecracker-containerd's tc-redirect-tap and Kata do: the guest's NIC takes
eth0's MAC and address, and the namespace itself routes nothing.

What comes from the guest is redirected only when it carries the pod's own MAC and address (IPv4 and ARP);
anything else falls into the namespace's own stack, which is made to forward nothing (forwarding off, strict
reverse-path filtering, no IPv6 and no ARP answers on the TAP), so a guest cannot spoof another address onto the
CNI network. This kernel has no gact (no tc drop action) and no matchall, hence u32 filters
and the fall-through.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path

from micropod import proc, syscalls
from micropod.errors import NetworkError
from micropod.net import netns
from micropod.netlink import NetlinkError, Rtnl, index_of

POD_TAP = "tap0"
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


NAMESPACE_SYSCTLS = (("net/ipv4/conf/all/forwarding", "0"), ("net/ipv6/conf/all/forwarding", "0"),
                     ("net/ipv4/conf/all/rp_filter", "1"))
# no IPv6 on the TAP at all (its link-local address would tell the guest its MAC), and no ARP answers from it
TAP_SYSCTLS = (("net/ipv6/conf/{tap}/disable_ipv6", "1"), ("net/ipv4/conf/{tap}/arp_ignore", "8"))


def _write_sysctl(key: str, value: str) -> None:
    """In the calling thread's network namespace: /proc/sys/net is the opener's."""
    with open(f"/proc/sys/{key}", "w") as f:
        f.write(value)


@dataclass(frozen=True)
class PodLink:
    netns: Path
    ifname: str  # CNI's interface in the namespace
    mac: str
    address: ipaddress.IPv4Address

    def _tc(self, *args: str) -> None:
        proc.run(["nsenter", f"--net={self.netns}", "tc", *args], timeout=15)

    def setup(self) -> None:
        """The TAP, up, and the redirects; a partial setup is undone by the namespace's removal."""
        def make_tap() -> None:
            # A new namespace copies the host's forwarding and rp_filter (micropod's bridge turns forwarding on):
            # what falls through the filters must die in a stack that routes nothing and answers no ARP for it.
            for key, value in NAMESPACE_SYSCTLS:
                _write_sysctl(key, value)
            if index_of(POD_TAP) is None:
                syscalls.create_persistent_tap(POD_TAP)
            for key, value in TAP_SYSCTLS:
                _write_sysctl(key.format(tap=POD_TAP), value)
            index = index_of(POD_TAP)
            if index is None:
                raise NetworkError(f"the pod's TAP vanished right after it was created in {self.netns}")
            with Rtnl() as rtnl:
                rtnl.set_link(index, up=True)

        try:
            netns.run_inside(self.netns, make_tap)
        except (OSError, NetlinkError) as exc:
            raise NetworkError(f"cannot create the pod's TAP in {self.netns}: {exc.strerror}") from None
        for dev in (self.ifname, POD_TAP):
            self._tc("qdisc", "replace", "dev", dev, "ingress")
        redirect = ("action", "mirred", "egress", "redirect", "dev")
        self._tc("filter", "replace", "dev", self.ifname, "parent", "ffff:", "pref", "1", "protocol", "all",
                 "u32", "match", "u8", "0", "0", *redirect, POD_TAP)
        mac = self.mac.replace(":", "")
        src_mac = ("match", "u32", f"0x{mac[:8]}", "0xffffffff", "at", "-8", "match", "u16", f"0x{mac[8:]}",
                   "0xffff", "at", "-4")
        self._tc("filter", "replace", "dev", POD_TAP, "parent", "ffff:", "pref", "1", "protocol", "ip", "u32",
                 "match", "ip", "src", f"{self.address}/32", *src_mac, *redirect, self.ifname)
        # ARP: the sender's hardware address at 8, its protocol address at 14 (u32 keys sit on 4-byte offsets,
        # so that one is two 16-bit halves)
        sender_ip = f"{int(self.address):08x}"
        self._tc("filter", "replace", "dev", POD_TAP, "parent", "ffff:", "pref", "2", "protocol", "arp", "u32",
                 "match", "u32", f"0x{mac[:8]}", "0xffffffff", "at", "8", "match", "u16", f"0x{mac[8:]}", "0xffff",
                 "at", "12", "match", "u16", f"0x{sender_ip[:4]}", "0xffff", "at", "14", "match", "u16",
                 f"0x{sender_ip[4:]}", "0xffff", "at", "16", *src_mac, *redirect, self.ifname)


def interface_mac(path: Path, ifname: str) -> str:
    """The MAC of ``ifname`` inside the namespace at ``path``, for a CNI result that omits it (asked of the
    namespace's rtnetlink: sysfs would show the namespace it was mounted in)."""
    out = proc.run(["nsenter", f"--net={path}", "ip", "-j", "link", "show", "dev", ifname], check=False, timeout=15)
    try:
        links = json.loads(out.stdout)
        mac = links[0]["address"]
    except (ValueError, LookupError, TypeError):
        raise NetworkError(f"CNI made no interface {ifname} in {path}") from None
    return check_mac(mac, f"the MAC of {ifname} in {path}")


def check_mac(value: object, what: str) -> str:
    if not isinstance(value, str) or not _MAC.fullmatch(value) or int(value[:2], 16) & 1:
        raise NetworkError(f"{what} is not a unicast MAC address: {value!r}")
    return value.lower()
