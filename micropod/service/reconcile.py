"""Reconciliation, in one place: what a crash or a kill left behind is found and put right by every command
that reads state. VMs whose monitor and VMM both vanished are marked dead; their TAPs and rules, the
addresses of VMs that no longer exist, and the volumes that dead VMs still hold are freed."""

from __future__ import annotations

from micropod.context import Context
from micropod.net.config import NetworkConfig
from micropod.state import ACTIVE, VmRecord
from micropod.state.pods import POD_ACTIVE


def reconcile(ctx: Context) -> list[VmRecord]:
    """The state store's reconciliation, then a crashed run's network leftovers: TAPs and rules of VMs
    that no longer run, addresses of VMs that no longer exist. Cheap when there is nothing to do.

    The leftovers are read before the records: a VM records itself before it leases or attaches, so
    a run starting meanwhile is never mistaken for a leftover; and only those leftovers are freed.
    """
    state = ctx.state  # opening it makes the root and the database on first use
    attached, leased = _ids(ctx, "attachments", "leases")
    records = state.reconcile()
    pods = ctx.pods.reconcile()
    live_pods = {p.id for p in pods if p.status in POD_ACTIVE}
    active = {r.id for r in records if r.status in ACTIVE} | live_pods
    if attached - active:
        from micropod.net.host import HostNetwork

        def still_active(vm_id: str) -> bool:
            record = ctx.state.get(vm_id)
            pod = ctx.pods.get(vm_id) if record is None else None
            return (record is not None and record.status in ACTIVE) or (pod is not None and pod.status in POD_ACTIVE)

        host = HostNetwork(ctx.root)
        try:
            for vm_id in attached - active:
                host.detach(vm_id, unless=still_active)
        finally:
            host.close()
    stale = leased - {r.id for r in records} - {p.id for p in pods}
    if stale:
        from micropod.net.ipam import Ipam

        ipam = Ipam(ctx.root.db, NetworkConfig())
        try:
            for vm_id in stale:
                ipam.release(vm_id)
        finally:
            ipam.close()
    _free_volumes(ctx, active)
    return records


def _free_volumes(ctx: Context, active: set[str]) -> None:
    """A VM that ended without its monitor saying so (killed, crashed) still holds its volumes."""
    holders = _holders(ctx)
    if holders - active:
        for vm_id in holders - active:
            ctx.volumes.detach_all(vm_id)


def _holders(ctx: Context) -> set[str]:
    import sqlite3

    from micropod.state.db import connect

    conn = connect(ctx.root.db)
    try:
        return {row[0] for row in conn.execute("SELECT holder FROM volumes WHERE holder IS NOT NULL")}
    except sqlite3.OperationalError:  # no volume was ever made
        return set()
    finally:
        conn.close()


def _ids(ctx: Context, *tables: str) -> list[set[str]]:
    """The VM ids in each table; a table not made yet (nothing ever attached or leased) has none."""
    import sqlite3

    from micropod.state.db import connect

    conn = connect(ctx.root.db)
    try:
        found = []
        for table in tables:
            try:
                found.append({row[0] for row in conn.execute(f"SELECT vm_id FROM {table}")})
            except sqlite3.OperationalError:
                found.append(set())
        return found
    finally:
        conn.close()
