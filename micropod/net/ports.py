"""Published ports: docker's `-p [hostip:]hostport:guestport[/tcp|udp]`."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from micropod.errors import ConflictError, UsageError

PROTOCOLS = ("tcp", "udp")


@dataclass(frozen=True)
class PortMapping:
    host_port: int
    guest_port: int
    protocol: str = "tcp"
    host_ip: str | None = None

    def __str__(self) -> str:
        host = f"{self.host_ip}:" if self.host_ip else "0.0.0.0:"
        return f"{host}{self.host_port}->{self.guest_port}/{self.protocol}"


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise UsageError(f"invalid port spec {spec!r}: {text!r} is not a port number (1-65535)")
    return int(text)


def parse_publish(spec: str) -> PortMapping:
    body, _, protocol = spec.partition("/")
    protocol = protocol or "tcp"
    if protocol not in PROTOCOLS:
        raise UsageError(f"invalid port spec {spec!r}: protocol must be tcp or udp")
    parts = body.rsplit(":", 2)
    if len(parts) == 2:
        host_ip, host_port, guest_port = None, parts[0], parts[1]
    elif len(parts) == 3:
        host_ip, host_port, guest_port = parts
        try:
            host_ip = str(ipaddress.IPv4Address(host_ip))
        except ValueError:
            raise UsageError(f"invalid port spec {spec!r}: {host_ip!r} is not an IPv4 address") from None
    else:
        raise UsageError(f"invalid port spec {spec!r}: use [hostip:]hostport:guestport[/tcp|udp]")
    return PortMapping(_port(host_port, spec), _port(guest_port, spec), protocol, host_ip)


def _clash(a: PortMapping, b: PortMapping) -> bool:
    """The same port and protocol on the same host address; no address means all of them."""
    return ((a.protocol, a.host_port) == (b.protocol, b.host_port)
            and (a.host_ip is None or b.host_ip is None or a.host_ip == b.host_ip))


def check_unique(mappings: list[PortMapping], taken: list[PortMapping]) -> None:
    """Refuse a host port published twice (in this request, or by a running VM)."""
    seen: list[PortMapping] = list(taken)
    for mapping in mappings:
        if any(_clash(mapping, other) for other in seen):
            raise ConflictError(f"port {mapping.host_port}/{mapping.protocol} is already published")
        seen.append(mapping)


def check_host_port_free(mapping: PortMapping) -> None:
    """Refuse a port some host program listens on: its traffic would silently go to the VM instead."""
    kind = socket.SOCK_STREAM if mapping.protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as probe:
        # as a server would bind: connections in TIME_WAIT do not make a port busy
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((mapping.host_ip or "0.0.0.0", mapping.host_port))
        except OSError as exc:
            raise ConflictError(f"port {mapping.host_port}/{mapping.protocol} is already in use on the host "
                                f"({exc.strerror})") from None
