"""Guest addressing: loopback up, then the NIC's MAC, IPv4 address and default route, over rtnetlink.

A VM resumed from a boot snapshot has the template's view of its NIC, so the kernel's ``ip=``
argument cannot address it; the agent does, with the values the host leased.
"""

from __future__ import annotations

from micropod.netlink import NetlinkError, Rtnl, index_of

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class NetconfError(Exception):
    pass


def _index(name: str) -> int:
    index = index_of(name)
    if index is None:
        raise NetconfError(f"no network interface {name!r}")
    return index


def loopback_up() -> None:
    with Rtnl() as rtnl:
        rtnl.set_link(_index("lo"), up=True)


def configure(ifname: str, mac: str, address: str, prefixlen: int, gateway: str | None) -> None:
    """Give ``ifname`` its MAC, bring it up, add the address and the default route."""
    index = _index(ifname)
    try:
        with Rtnl() as rtnl:
            rtnl.set_link(index, up=True, mac=mac)
            rtnl.add_address(index, address, prefixlen)
            if gateway:
                rtnl.add_default_route(gateway, index)
    except NetlinkError as exc:
        raise NetconfError(f"configuring {ifname} as {address}/{prefixlen}: {exc.strerror}") from exc


def configure_from(spec: dict[str, Any]) -> None:
    """``{"ifname", "mac", "address": "10.88.0.2/16", "gateway"}`` as the host sends it."""
    address, _, prefix = str(spec["address"]).partition("/")
    configure(str(spec.get("ifname", "eth0")), str(spec["mac"]), address, int(prefix or 32), spec.get("gateway"))
