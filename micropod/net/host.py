"""One VM's networking on the host, set up and torn down as a unit: TAP, table row, nftables rules.

Every change happens under one lock (``net.lock`` in the state root) and ends by applying the whole
ruleset rebuilt from the ``attachments`` table, so concurrent runs never lose each other's rules and
a VM's rules vanish exactly when its row does. A failed attach undoes what it did.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict

from micropod.fsutil import flock
from micropod.net import links, nft
from micropod.net.addressing import tap_name
from micropod.net.config import NetworkConfig
from micropod.net.nft import VmNetwork
from micropod.net.ports import PortMapping, check_host_port_free, check_unique
from micropod.paths import StateRoot
from micropod.state import connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS attachments (
    vm_id  TEXT PRIMARY KEY,
    tap    TEXT NOT NULL,
    mac    TEXT NOT NULL,
    ip     TEXT NOT NULL,
    ports  TEXT NOT NULL
)
"""


class HostNetwork:
    def __init__(self, root: StateRoot, network: NetworkConfig) -> None:
        self.root = root
        self.network = network
        self._conn = connect(root.db, SCHEMA)

    def close(self) -> None:
        self._conn.close()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with flock(self.root.path / "net.lock"):
            yield

    def attachments(self) -> list[VmNetwork]:
        rows = self._conn.execute("SELECT vm_id, tap, mac, ip, ports FROM attachments ORDER BY rowid").fetchall()
        return [VmNetwork(vm_id, tap, mac, ipaddress.IPv4Address(ip),
                          tuple(PortMapping(**p) for p in json.loads(ports)))
                for vm_id, tap, mac, ip, ports in rows]

    def published(self, exclude: str | None = None) -> list[PortMapping]:
        return [p for vm in self.attachments() if vm.vm_id != exclude for p in vm.ports]

    def attach(self, vm: VmNetwork) -> None:
        """Bridge (if missing), the VM's TAP, and rules; the ports are checked again under the lock."""
        with self._locked():
            others = [a for a in self.attachments() if a.vm_id != vm.vm_id]
            check_unique(list(vm.ports), [p for a in others for p in a.ports])
            for port in vm.ports:
                check_host_port_free(port)
            links.ensure_bridge(self.network)
            try:
                links.create_tap(vm.tap, self.network.bridge)
                self._store(vm)
                self._apply([*others, vm])
            except BaseException:
                self._forget(vm.vm_id)
                links.delete_tap(vm.tap)
                with contextlib.suppress(Exception):
                    self._apply(others)
                raise

    def detach(self, vm_id: str) -> bool:
        """Remove the VM's TAP, row and rules; idempotent. True if anything was there."""
        with self._locked():
            attached = [a for a in self.attachments() if a.vm_id == vm_id]
            tap = attached[0].tap if attached else tap_name(vm_id)
            if not attached and not links.link_exists(tap):
                return False
            links.delete_tap(tap)
            self._forget(vm_id)
            self._apply(self.attachments())
            return True

    def reclaim(self, keep: Iterable[str]) -> list[str]:
        """Detach every VM not in ``keep`` (a crashed monitor's leftovers); the ids detached."""
        alive = set(keep)
        stale = [a.vm_id for a in self.attachments() if a.vm_id not in alive]
        for vm_id in stale:
            self.detach(vm_id)
        return stale

    def _apply(self, vms: list[VmNetwork]) -> None:
        # With no VM left, nothing of micropod's stays in the firewall.
        if vms:
            nft.apply(nft.ruleset(self.network, vms))
        else:
            nft.remove()

    def _store(self, vm: VmNetwork) -> None:
        ports = json.dumps([asdict(p) for p in vm.ports])
        self._conn.execute("INSERT OR REPLACE INTO attachments VALUES (?, ?, ?, ?, ?)",
                           (vm.vm_id, vm.tap, vm.mac, str(vm.ip), ports))

    def _forget(self, vm_id: str) -> None:
        self._conn.execute("DELETE FROM attachments WHERE vm_id = ?", (vm_id,))
