"""`micropod update` on a running VM: the new limits of the container's config.json, applied where they live
(the VMM's host cgroup, the VMM's disk throttles and network rate); the guest's own (pids) by the caller."""

from __future__ import annotations

from typing import TYPE_CHECKING

from micropod.monitor.hostcgroup import caps
from micropod.monitor.launch import send_rate
from micropod.net import lifecycle
from micropod.paths import StateRoot, VmDir
from micropod.runconfig import RunConfig
from micropod.vmm.factory import disk_limits

if TYPE_CHECKING:
    from micropod.monitor.launch import VmProcess


def apply_update(root: StateRoot, old: RunConfig, vm_dir: VmDir, vm: VmProcess) -> RunConfig:
    new = RunConfig.load(vm_dir.config)
    if vm.host_cgroup is not None:
        vm.host_cgroup.update(caps(new.cpu_limit or new.vcpus, new.memory_mib, new.quotas))
    if vm.vmm is not None and vm.vmm.wait(0) is None:
        before = disk_limits(old)
        drives = {drive: limits for drive, limits in disk_limits(new).items() if before.get(drive) != limits}
        rate = new.quotas.network_rate
        net_rate = rate if rate != old.quotas.network_rate and new.network.enabled else None
        if drives or net_rate is not None:
            vm.vmm.change_limits(drives, net_rate)
        if net_rate is not None and send_rate(new) != send_rate(old):
            lifecycle.set_send_rate(root, new.vm_id, send_rate(new))
    return new
