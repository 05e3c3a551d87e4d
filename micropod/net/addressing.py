"""Deterministic per-VM names and MAC addresses."""

from __future__ import annotations

import hashlib


def mac_for(vm_id: str) -> str:
    """A locally administered unicast MAC derived from the VM id, stable across restarts."""
    digest = hashlib.sha256(f"micropod-mac:{vm_id}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def tap_name(vm_id: str) -> str:
    """At most 15 characters (IFNAMSIZ - 1), recognisably ours."""
    return f"mp-{vm_id[:12]}"
