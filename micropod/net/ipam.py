"""IP leases for VMs, kept in the state database so that concurrent `run`s never share an address.

Writers take the database lock up front (BEGIN IMMEDIATE), pick the lowest free host address, and
commit; a lease belongs to a VM id until released, and `reclaim` frees the leases of VMs that no
longer exist (after a crash).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable
from pathlib import Path

from micropod.errors import ConflictError
from micropod.net.config import NetworkConfig
from micropod.state.db import open_tables
from micropod.state.tables import LEASES


class Ipam:
    def __init__(self, db: Path, network: NetworkConfig) -> None:
        self.network = network
        self._conn = open_tables(db, LEASES)

    def close(self) -> None:
        self._conn.close()

    def lease(self, vm_id: str) -> ipaddress.IPv4Address:
        """The VM's address: its existing lease, or the lowest free one in the subnet."""
        subnet = str(self.network.subnet)
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            row = self._conn.execute("SELECT ip FROM leases WHERE vm_id = ?", (vm_id,)).fetchone()
            if row:
                self._conn.execute("COMMIT")
                return ipaddress.IPv4Address(row[0])
            taken = {ipaddress.IPv4Address(r[0]) for r in
                     self._conn.execute("SELECT ip FROM leases WHERE subnet = ?", (subnet,))}
            taken.add(self.network.gateway)
            for address in self.network.subnet.hosts():
                if address not in taken:
                    self._conn.execute("INSERT INTO leases VALUES (?, ?, ?, ?)",
                                       (str(address), vm_id, subnet, time.time()))
                    self._conn.execute("COMMIT")
                    return address
            raise ConflictError(f"no free address left in {subnet}: remove containers or choose a larger subnet")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def release(self, vm_id: str) -> None:
        self._conn.execute("DELETE FROM leases WHERE vm_id = ?", (vm_id,))

    def leases(self) -> dict[str, ipaddress.IPv4Address]:
        rows = self._conn.execute("SELECT vm_id, ip FROM leases").fetchall()
        return {vm_id: ipaddress.IPv4Address(ip) for vm_id, ip in rows}

    def reclaim(self, existing_vms: Iterable[str]) -> list[str]:
        """Free the leases of VMs that are gone; the ids whose leases were freed."""
        keep = set(existing_vms)
        stale = [vm_id for vm_id in self.leases() if vm_id not in keep]
        for vm_id in stale:
            self.release(vm_id)
        return stale
