"""micropod's state, all of it under the state root: state.db's tables (each declared in ``tables`` and
migrated one way, by ``db``), the VMs' table and its store (``vms``), and the versioned JSON records kept
beside them (``records``)."""

from micropod.state.vms import ACTIVE, STATUSES, StateStore, VmRecord, name_in_use

__all__ = ["ACTIVE", "STATUSES", "StateStore", "VmRecord", "name_in_use"]
