"""Each VMM process in a host cgroup of its own, with CPU and memory caps sized from the container's --cpus
and --memory, so that a guest that spins or balloons takes no more than its share of the host. The cgroup
code is micropod-runtime's (v1 and v2: this host is v1 hybrid)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from micropod.errors import CgroupError, VmmError
from micropod.quotas import Quotas
from micropod.runtime.cgroups import Cgroup, open_cgroup

log = logging.getLogger("micropod.monitor")

PARENT = "/micropod-vmm"
PERIOD_US = 100_000
# What QEMU needs beside the guest's RAM: its own heap and, under TCG, the translated code (measured at
# 100-125 MiB of PSS for an idle 256 MiB VM); the cap leaves room so that QEMU is never the OOM killer's choice
# while the guest stays within its own memory.
OVERHEAD_MIB = 512


def caps(cpus: float, memory_mib: int, quotas: Quotas | None = None) -> dict[str, Any]:
    """The cgroup resources for a VM: ``cpus`` CPUs' worth of time per period (0.5 is half of one, whatever
    the vCPUs the guest sees), and its memory plus the VMM's overhead; the quotas' CPU shares, cpuset and
    memory reservation (which is the guest's, so the VMM's overhead is added to it too)."""
    quotas = quotas or Quotas()
    cpu: dict[str, Any] = {"quota": int(cpus * PERIOD_US), "period": PERIOD_US}
    if quotas.cpu_shares:
        cpu["shares"] = quotas.cpu_shares
    if quotas.cpuset_cpus:
        cpu["cpus"] = quotas.cpuset_cpus
    memory: dict[str, Any] = {"limit": (memory_mib + OVERHEAD_MIB) << 20}
    if quotas.memory_reservation_mib:
        memory["reservation"] = (quotas.memory_reservation_mib + OVERHEAD_MIB) << 20
    return {"cpu": cpu, "memory": memory}


class VmmCgroup:
    """The VMM's cgroup. Where the cgroup filesystem cannot be reached (a monitor started by `ip netns exec`,
    which mounts a fresh /sys without it), the VM runs uncapped and monitor.log says so in one line."""

    def __init__(self, vm_id: str, cpus: float, memory_mib: int, quotas: Quotas | None = None) -> None:
        self.vm_id = vm_id
        self.resources = caps(cpus, memory_mib, quotas)
        self.group: Cgroup | None = None

    def create(self) -> None:
        try:
            self.group = open_cgroup(f"{PARENT}/{self.vm_id}", self.vm_id)
        except (CgroupError, OSError) as exc:
            log.warning("the VMM runs without a host cgroup of its own: %s", exc)
            return
        try:
            self.group.create()
            self.group.apply(self.resources)
        except (CgroupError, OSError) as exc:
            self.destroy()
            raise VmmError(f"cannot give the VMM a cgroup of its own: {exc}") from exc

    def update(self, resources: dict[str, Any]) -> None:
        """New caps for a running VM (`micropod update`)."""
        self.resources = resources
        if self.group is None:
            return
        try:
            self.group.apply(resources)
        except (CgroupError, OSError) as exc:
            raise VmmError(f"cannot change the VMM's cgroup: {exc}") from exc

    def add(self, pid: int) -> None:
        if self.group is None:
            return
        try:
            self.group.add(pid)
        except (CgroupError, OSError) as exc:
            raise VmmError(f"cannot move the VMM (pid {pid}) into its cgroup: {exc}") from exc

    def destroy(self) -> None:
        if self.group is None:
            with contextlib.suppress(CgroupError, OSError):
                self.group = open_cgroup(f"{PARENT}/{self.vm_id}", self.vm_id)
        if self.group is None:
            return
        try:
            self.group.destroy()
        except (CgroupError, OSError) as exc:  # a VMM still exiting: the next rm's business
            log.warning("the VMM's cgroup was not removed: %s", exc)
