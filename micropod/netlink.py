"""A small rtnetlink client on the standard library, shared by the host and the guest agent.

It does only what micropod needs: create and delete links, set them up with a master or a MAC, add
IPv4 addresses and a default route, and read addresses and link kinds back. pyroute2 would do the
same, but importing it costs 0.25-0.4 s, and both `run` and the guest's boot pay for every import.
"""

from __future__ import annotations

import _socket
import os
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE = 24
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP_INTR = 0x1, 0x2, 0x4, 0x10
DUMP_ATTEMPTS = 5
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x100, 0x200, 0x400, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFF_UP = 0x1
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO, IFLA_IFALIAS = 1, 3, 10, 18, 20
IFALIASZ = 256
IFLA_INFO_KIND = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_OIF, RTA_GATEWAY = 4, 5
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 3, 0, 1
AF_UNSPEC, AF_INET = 0, 2
EINTR, ENODEV, EEXIST = 4, 19, 17
NLA_F_NESTED = 0x8000

_HEADER = struct.Struct("IHHII")
_IFINFO = struct.Struct("BxHiII")  # family, type, index, flags, change
_IFADDR = struct.Struct("BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags


class NetlinkError(OSError):
    """The kernel refused a request; ``errno`` says why."""


def attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def parse_attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    found = {}
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("HH", data, offset)
        if length < 4:
            break
        found[kind & ~NLA_F_NESTED] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return found


def _cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def index_of(name: str) -> int | None:
    try:
        return int(_socket.if_nametoindex(name))
    except OSError:
        return None


class Rtnl:
    def __init__(self) -> None:
        self.sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _send(self, kind: int, flags: int, body: bytes) -> int:
        self.seq += 1
        self.sock.send(_HEADER.pack(_HEADER.size + len(body), kind, NLM_F_REQUEST | flags, self.seq, 0) + body)
        return self.seq

    def _messages(self, seq: int) -> Iterator[tuple[int, int, bytes]]:
        """(type, flags, body) of each answer to request ``seq``, until it ends."""
        while True:
            data = self.sock.recv(1 << 16)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, flags, got, _ = _HEADER.unpack_from(data, offset)
                body = data[offset + _HEADER.size:offset + length]
                offset += (length + 3) & ~3
                if got != seq:
                    continue
                if kind == NLMSG_ERROR:
                    (error,) = struct.unpack_from("i", body)
                    if error:
                        raise NetlinkError(-error, os.strerror(-error))
                    return
                if kind == NLMSG_DONE:
                    (error,) = struct.unpack_from("i", body) if len(body) >= 4 else (0,)
                    if error < 0:  # a dump that failed part way
                        raise NetlinkError(-error, os.strerror(-error))
                    return
                yield kind, flags, body

    def request(self, kind: int, flags: int, body: bytes) -> None:
        """One change, waited for: its acknowledgement, or the kernel's errno as a NetlinkError."""
        for _ in self._messages(self._send(kind, flags | NLM_F_ACK, body)):
            pass

    def dump(self, kind: int, body: bytes) -> list[bytes]:
        """Every message of a dump; one that changed while it was read (DUMP_INTR) is read again."""
        for _ in range(DUMP_ATTEMPTS):
            answers = list(self._messages(self._send(kind, NLM_F_DUMP, body)))
            if not any(flags & NLM_F_DUMP_INTR for _, flags, _ in answers):
                return [message for _, _, message in answers]
        raise NetlinkError(EINTR, "the kernel's table kept changing while it was read")

    # -- links ------------------------------------------------------------------------------------

    def add_link(self, name: str, kind: str) -> None:
        info = attr(IFLA_LINKINFO | NLA_F_NESTED, attr(IFLA_INFO_KIND, _cstr(kind)))
        body = _IFINFO.pack(AF_UNSPEC, 0, 0, 0, 0) + attr(IFLA_IFNAME, _cstr(name)) + info
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)

    def set_link(self, index: int, up: bool = True, master: int | None = None, mac: str | None = None) -> None:
        body = _IFINFO.pack(AF_UNSPEC, 0, index, IFF_UP if up else 0, IFF_UP)
        if master is not None:
            body += attr(IFLA_MASTER, struct.pack("I", master))
        if mac is not None:
            body += attr(IFLA_ADDRESS, mac_bytes(mac))
        self.request(RTM_NEWLINK, 0, body)

    def set_alias(self, index: int, alias: str) -> None:
        """The link's free-text alias (``ip link ... alias``), at most IFALIASZ - 1 bytes."""
        data = alias.encode()[:IFALIASZ - 1]
        self.request(RTM_NEWLINK, 0, _IFINFO.pack(AF_UNSPEC, 0, index, 0, 0) + attr(IFLA_IFALIAS, data))

    def delete_link(self, index: int) -> None:
        self.request(RTM_DELLINK, 0, _IFINFO.pack(AF_UNSPEC, 0, index, 0, 0))

    def _link_attrs(self, index: int) -> dict[int, bytes]:
        body = _IFINFO.pack(AF_UNSPEC, 0, index, 0, 0)
        for _, _, message in self._messages(self._send(RTM_GETLINK, 0, body)):
            return parse_attrs(message, _IFINFO.size)
        return {}

    def link_kind(self, index: int) -> str | None:
        """"bridge", "tun", "veth"...; None for a device without a kind (a physical NIC, lo)."""
        info = self._link_attrs(index).get(IFLA_LINKINFO)
        kind = parse_attrs(info).get(IFLA_INFO_KIND) if info else None
        return kind.rstrip(b"\0").decode() if kind else None

    def link_alias(self, index: int) -> str:
        """The link's alias, "" if it has none."""
        raw = self._link_attrs(index).get(IFLA_IFALIAS, b"")
        return raw.split(b"\0", 1)[0].decode(errors="replace")

    # -- addresses and routes ---------------------------------------------------------------------

    def add_address(self, index: int, address: str, prefixlen: int) -> None:
        packed = _socket.inet_aton(address)
        body = _IFADDR.pack(AF_INET, prefixlen, 0, 0, index) + attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed)
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, body)

    def addresses(self) -> list[tuple[int, str, int]]:
        """Every IPv4 address here as (interface index, address, prefix length)."""
        found = []
        for message in self.dump(RTM_GETADDR, _IFADDR.pack(AF_INET, 0, 0, 0, 0)):
            _, prefixlen, _, _, index = _IFADDR.unpack_from(message)
            attrs = parse_attrs(message, _IFADDR.size)
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw:
                found.append((index, _socket.inet_ntoa(raw), prefixlen))
        return found

    def add_default_route(self, gateway: str, index: int) -> None:
        body = _RTMSG.pack(AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
        body += attr(RTA_GATEWAY, _socket.inet_aton(gateway)) + attr(RTA_OIF, struct.pack("I", index))
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)
