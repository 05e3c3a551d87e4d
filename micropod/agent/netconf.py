"""Guest addressing over rtnetlink: MAC, link up, IPv4 address, default route. Stdlib only.

A VM resumed from a boot snapshot has the template's view of its NIC, so the kernel's ``ip=``
argument cannot address it; the agent does, with the values the host leased.
"""

from __future__ import annotations

import _socket
import os
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE = 16, 20, 24
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_REPLACE = 0x1, 0x4, 0x200, 0x400, 0x100
NLMSG_ERROR = 2
IFF_UP = 0x1
IFLA_ADDRESS = 1
IFA_LOCAL, IFA_ADDRESS = 2, 1
RTA_GATEWAY, RTA_OIF = 5, 4
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 3, 0, 1
AF_INET = 2
AF_UNSPEC = 0


class NetconfError(Exception):
    pass


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def _ipv4(text: str) -> bytes:
    return _socket.inet_aton(text)


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


class Rtnl:
    def __init__(self) -> None:
        self.sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def request(self, kind: int, flags: int, body: bytes) -> None:
        """Send one message and wait for its acknowledgement; a negative errno becomes an error."""
        self.seq += 1
        header = struct.pack("IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags, self.seq, 0)
        self.sock.send(header + body)
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset < len(data):
                length, msg_type, _, seq, _ = struct.unpack_from("IHHII", data, offset)
                if msg_type == NLMSG_ERROR and seq == self.seq:
                    (error,) = struct.unpack_from("i", data, offset + 16)
                    if error:
                        raise NetconfError(f"netlink request {kind}: {os.strerror(-error)} (errno {-error})")
                    return
                offset += (length + 3) & ~3


def interface_index(name: str) -> int:
    for index, ifname in _socket.if_nameindex():
        if ifname == name:
            return int(index)
    raise NetconfError(f"no network interface {name!r}")


def configure(ifname: str, mac: str, address: str, prefixlen: int, gateway: str | None) -> None:
    """Give ``ifname`` its MAC, bring it up, add the address and the default route."""
    index = interface_index(ifname)
    rtnl = Rtnl()
    try:
        # ifinfomsg: family, pad, type, index, flags, change
        link = struct.pack("BxHiII", AF_UNSPEC, 0, index, IFF_UP, IFF_UP) + _attr(IFLA_ADDRESS, _mac(mac))
        rtnl.request(RTM_NEWLINK, 0, link)
        # ifaddrmsg: family, prefixlen, flags, scope, index
        addr = struct.pack("BBBBI", AF_INET, prefixlen, 0, 0, index)
        addr += _attr(IFA_LOCAL, _ipv4(address)) + _attr(IFA_ADDRESS, _ipv4(address))
        rtnl.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, addr)
        if gateway:
            # rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
            route = struct.pack("BBBBBBBBI", AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE,
                                RTN_UNICAST, 0)
            route += _attr(RTA_GATEWAY, _ipv4(gateway)) + _attr(RTA_OIF, struct.pack("I", index))
            rtnl.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, route)
    finally:
        rtnl.close()


def configure_from(spec: dict[str, Any]) -> None:
    """``{"ifname", "mac", "address": "10.88.0.2/16", "gateway"}`` as the host sends it."""
    address, _, prefix = str(spec["address"]).partition("/")
    configure(str(spec.get("ifname", "eth0")), str(spec["mac"]), address, int(prefix or 32), spec.get("gateway"))
