"""One VM's networking on the host, set up and torn down as a unit: TAP, table row, nftables rules.

Every change happens under one host-wide lock (``owner.host_lock``) and ends by applying this root's
whole ruleset, rebuilt from its ``attachments`` table into its own tables, so concurrent runs never
lose each other's rules, a VM's rules vanish exactly when its row does, and no other state root's
rules or bridges are touched. A failed attach undoes what it did.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict

from micropod.net import links, nft, owner
from micropod.net.addressing import tap_name
from micropod.net.config import NetworkConfig
from micropod.net.nft import VmNetwork
from micropod.net.ports import PortMapping, check_host_port_free, check_unique
from micropod.paths import StateRoot
from micropod.state.db import open_tables
from micropod.state.tables import ATTACHMENTS


class HostNetwork:
    def __init__(self, root: StateRoot) -> None:
        self.root = root
        self.owner = owner.Owner.of(root.path)
        self._conn = open_tables(root.db, ATTACHMENTS)

    def close(self) -> None:
        self._conn.close()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with owner.host_lock():
            yield

    def attachments(self) -> list[VmNetwork]:
        rows = self._conn.execute("SELECT vm_id, tap, mac, ip, ports, bridge, subnet, icc, rate, metadata_port "
                                  "FROM attachments ORDER BY rowid").fetchall()
        return [VmNetwork(vm_id, tap, mac, ipaddress.IPv4Address(ip),
                          tuple(PortMapping(**p) for p in json.loads(ports)),
                          NetworkConfig.parse(bridge, subnet) if bridge else NetworkConfig(), bool(icc), rate,
                          metadata_port)
                for vm_id, tap, mac, ip, ports, bridge, subnet, icc, rate, metadata_port in rows]

    def check_ports(self, ports: tuple[PortMapping, ...], vm_id: str | None = None) -> None:
        """Refuse ports another VM (of any state root) publishes or a host program listens on."""
        if not ports:
            return
        taken = [p for vm in self.attachments() if vm.vm_id != vm_id for p in vm.ports]
        check_unique(list(ports), taken + nft.published_elsewhere(self.owner.table))
        for port in ports:
            check_host_port_free(port)

    def attach(self, vm: VmNetwork) -> None:
        """Bridge (if missing), the VM's TAP, and rules; the ports are checked again under the lock."""
        with self._locked():
            self.check_ports(vm.ports, vm.vm_id)
            others = [a for a in self.attachments() if a.vm_id != vm.vm_id]
            owner.ensure_bridge(vm.network, self.owner)
            # The row first: whatever a crash leaves from here on, reconciliation finds through it.
            self._store(vm)
            try:
                links.create_tap(vm.tap, vm.network.bridge)
                self._apply([*others, vm])
            except BaseException:
                with contextlib.suppress(Exception):
                    self._apply(others)
                links.delete_tap(vm.tap)
                self._forget(vm.vm_id)
                raise

    def set_rate(self, vm_id: str, rate: int) -> None:
        """A new send rate for an attached VM (`micropod update --network-rate`)."""
        with self._locked():
            before = next((a.rate for a in self.attachments() if a.vm_id == vm_id), 0)
            self._conn.execute("UPDATE attachments SET rate = ? WHERE vm_id = ?", (rate, vm_id))
            try:
                self._apply(self.attachments())
            except BaseException:
                # the row must not keep what nft refused: every later attach and detach would apply it again
                self._conn.execute("UPDATE attachments SET rate = ? WHERE vm_id = ?", (before, vm_id))
                raise

    def detach(self, vm_id: str, unless: Callable[[str], bool] | None = None) -> bool:
        """Remove the VM's rules, TAP and row, in that order; idempotent. True if anything was there.

        ``unless`` is asked under the lock: reconciliation uses it so that a VM started again since
        it looked is left alone.
        """
        with self._locked():
            if unless is not None and unless(vm_id):
                return False
            rows = self.attachments()
            attached = [a for a in rows if a.vm_id == vm_id]
            tap = attached[0].tap if attached else tap_name(vm_id)
            if not attached and not links.link_exists(tap):
                return False
            # Rules go while the TAP still exists (its ingress chain is bound to it); if that fails,
            # the row stays for the next try.
            self._apply([a for a in rows if a.vm_id != vm_id])
            links.delete_tap(tap)
            self._forget(vm_id)
            return True

    def reclaim(self, is_active: Callable[[str], bool]) -> list[str]:
        """Detach every VM that no longer runs (a crashed monitor's leftovers); the ids detached."""
        stale = [a.vm_id for a in self.attachments() if not is_active(a.vm_id)]
        return [vm_id for vm_id in stale if self.detach(vm_id, unless=is_active)]

    def _apply(self, vms: list[VmNetwork]) -> None:
        # With no VM left, nothing of micropod's stays in the firewall.
        if vms:
            nft.apply(nft.ruleset(vms, self.owner.table))
        else:
            nft.remove(self.owner.table)

    def _store(self, vm: VmNetwork) -> None:
        ports = json.dumps([asdict(p) for p in vm.ports])
        self._conn.execute("INSERT OR REPLACE INTO attachments (vm_id, tap, mac, ip, ports, bridge, subnet, icc, "
                           "rate, metadata_port) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (vm.vm_id, vm.tap, vm.mac, str(vm.ip), ports, vm.network.bridge, str(vm.network.subnet),
                            int(vm.icc), vm.rate, vm.metadata_port))

    def _forget(self, vm_id: str) -> None:
        self._conn.execute("DELETE FROM attachments WHERE vm_id = ?", (vm_id,))
