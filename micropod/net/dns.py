"""The guest's /etc/resolv.conf and /etc/hosts, with docker's rules.

The host's resolvers are copied, minus loopback ones (127.0.0.53 and the like cannot be reached from
inside a VM) and the host's own addresses (VMs may not reach the host's services: a dnsmasq on the
host's LAN address is out of bounds too); if none remain, public resolvers stand in. ``--dns``
replaces the nameservers and keeps the host's search domains and options.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from micropod.errors import UsageError

HOST_RESOLV_CONF = Path("/etc/resolv.conf")
FALLBACK_NAMESERVERS = ("8.8.8.8", "8.8.4.4")


def check_nameserver(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise UsageError(f"invalid --dns {text!r}: not an IP address") from None


def host_addresses() -> frozenset[str]:
    """The host's own IPv4 addresses; none if netlink cannot say (the filter then drops what it must)."""
    from micropod.netlink import Rtnl

    try:
        with Rtnl() as rtnl:
            return frozenset(address for _, address, _ in rtnl.addresses())
    except OSError:
        return frozenset()


def _reachable_from_guest(address: str, local: frozenset[str]) -> bool:
    try:
        parsed = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    return not parsed.is_loopback and str(parsed) not in local


def resolv_conf(dns: tuple[str, ...] = (), host_file: Path = HOST_RESOLV_CONF,
                local: frozenset[str] | None = None) -> str:
    try:
        lines = host_file.read_text().splitlines()
    except OSError:
        lines = []
    kept, servers = [], []
    local = host_addresses() if local is None and not dns else local or frozenset()
    for line in lines:
        fields = line.split()
        if fields[:1] == ["nameserver"] and len(fields) > 1:
            if _reachable_from_guest(fields[1], local):
                servers.append(fields[1])
        elif fields[:1] in (["search"], ["domain"], ["options"]):
            kept.append(" ".join(fields))
    chosen = list(dns) or servers or list(FALLBACK_NAMESERVERS)
    return "".join(f"nameserver {server}\n" for server in chosen) + "".join(f"{line}\n" for line in kept)


def with_search(resolv: str, search: tuple[str, ...], options: tuple[str, ...]) -> str:
    """``resolv`` with its search and options lines replaced by these (kubelet's DNS config for a pod)."""
    for word in (*search, *options):
        if not word or any(c.isspace() or not c.isprintable() for c in word):
            raise UsageError(f"invalid DNS search domain or option {word!r}")
    if not search and not options:
        return resolv
    kept = [line for line in resolv.splitlines()
            if line.split()[:1] not in (["search"], ["domain"]) or not search]
    kept = [line for line in kept if line.split()[:1] != ["options"] or not options]
    extra = ([f"search {' '.join(search)}"] if search else []) + ([f"options {' '.join(options)}"] if options else [])
    return "".join(f"{line}\n" for line in kept + extra)


def hosts_file(hostname: str, address: str | None) -> str:
    text = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    if hostname:
        text += f"{address or '127.0.1.1'}\t{hostname}\n"
    return text
