"""Which state root a network belongs to, so that no root removes or collides with another's.

Every root has its own nftables tables, named after a tag of its resolved path, and touches no
other. A bridge records its owner in its link alias (``micropod <tag> <root path>``): the record
lives and dies with the bridge and is per network namespace, as the bridge is, so it never goes
stale the way a file under /run would. A root may take a bridge over only while the owner has no
VM attached (its tables are absent); otherwise it gets a ConflictError. The check and the change
happen under one host-wide lock, which also covers the published ports of every root.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from micropod.errors import ConflictError, NetworkError
from micropod.fsutil import flock
from micropod.net import nft
from micropod.net.config import NetworkConfig
from micropod.net.links import check_bridge, ensure_owned_bridge
from micropod.netlink import Rtnl, index_of

RUN_DIR = Path("/run/micropod")
_ALIAS = "micropod"


@dataclass(frozen=True)
class Owner:
    """A state root as the host's network sees it."""

    root: Path  # resolved: two spellings of one root are one owner

    @classmethod
    def of(cls, root: Path) -> Owner:
        return cls(root.resolve())

    @property
    def tag(self) -> str:
        return hashlib.sha256(os.fsencode(self.root)).hexdigest()[:12]

    @property
    def table(self) -> str:
        return f"{nft.PREFIX}-{self.tag}"

    @property
    def alias(self) -> str:
        return f"{_ALIAS} {self.tag} {self.root}"


def recorded_owner(alias: str) -> tuple[str, str] | None:
    """(tag, root path) from a bridge's alias; None if micropod never claimed it."""
    fields = alias.split(" ", 2)
    if len(fields) < 2 or fields[0] != _ALIAS:
        return None
    return fields[1], fields[2] if len(fields) == 3 else "?"


def check(rtnl: Rtnl, network: NetworkConfig, me: Owner) -> None:
    """A ConflictError if the bridge (or its subnet) is someone else's, or another root has VMs on it."""
    if not check_bridge(rtnl, network):
        return
    index = index_of(network.bridge)
    found = recorded_owner(rtnl.link_alias(index)) if index is not None else None
    if found and found[0] != me.tag and nft.has_table(f"{nft.PREFIX}-{found[0]}"):
        raise ConflictError(f"bridge {network.bridge} belongs to the state root {found[1]}, which has VMs on it; "
                            "give this root its own network with MICROPOD_BRIDGE and MICROPOD_SUBNET")


def ensure_bridge(network: NetworkConfig, me: Owner) -> None:
    """The bridge, made or taken over for ``me``; call it under ``host_lock``."""
    with Rtnl() as rtnl:
        check(rtnl, network, me)
    ensure_owned_bridge(network, me.alias)


@contextlib.contextmanager
def host_lock() -> Iterator[None]:
    """Serialise network changes of every state root on this host (all namespaces: it is cheap)."""
    try:
        RUN_DIR.mkdir(mode=0o700, exist_ok=True)
        info = RUN_DIR.lstat()
    except OSError as exc:
        raise NetworkError(f"cannot create {RUN_DIR}: {exc.strerror}") from exc
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise NetworkError(f"{RUN_DIR} is not a directory of this user's; remove it")
    with flock(RUN_DIR / "net.lock"):
        yield
