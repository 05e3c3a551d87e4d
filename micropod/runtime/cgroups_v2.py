"""The cgroup v2 manager: one directory in the unified hierarchy, written as runc 1.1's fs2 driver does.

The spec's numbers are v1's; they are converted as runc converts them (cpu.shares to cpu.weight,
blkio weight to io.weight, memory+swap to swap alone). Device rules become an eBPF program attached to
the cgroup (BPF_CGROUP_DEVICE), built from the same policy the v1 manager writes. Realtime CPU time has
no v2 interface and is refused; swappiness, disableOOMKiller and the network classes are ignored, as runc
does.

Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import json
import os
import select
import signal as signals
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from micropod import syscalls
from micropod.errors import CgroupError, SpecError
from micropod.runtime.cgroups import (
    CGROUP_ROOT,
    FREEZE_TIMEOUT,
    UNLIMITED,
    FreezerState,
    add_process,
    cgroup_pids,
    cpu_weight_from_shares,
    io_weight_from_blkio,
    is_cgroup2,
    make_cgroup_dir,
    omit_zero,
    read_key_values,
    read_number,
    read_optional,
    remove_cgroup_dir,
    signal_all,
    v2_limit,
    v2_swap,
    validate_resources,
    write_raw,
    write_value,
)


class V2Cgroup:
    def __init__(self, root: Path, path: Path) -> None:
        self.root = root
        self.path = path

    def paths(self) -> dict[str, str]:
        return {"": str(self.path)}

    def validate(self, resources: Mapping[str, Any], field: str = "linux.resources") -> None:
        validate_resources(resources, field)
        cpu = resources.get("cpu") or {}
        for key in ("realtimeRuntime", "realtimePeriod"):
            if cpu.get(key):
                raise SpecError(f"{field}.cpu.{key}", "realtime CPU time needs cgroup v1")

    def create(self) -> None:
        """mkdir -p, enabling in every ancestor's cgroup.subtree_control the controllers the root offers
        (best effort, one by one if all at once fails: some may be unavailable)."""
        offered = (read_optional(self.root, "cgroup.controllers") or "").split()
        wanted = " ".join(f"+{name}" for name in offered)
        levels = [self.root]
        for part in self.path.relative_to(self.root).parts:
            levels.append(levels[-1] / part)
        for parent, child in itertools.pairwise(levels):
            enabled = set((read_optional(parent, "cgroup.subtree_control") or "").split())
            if wanted and not set(offered) <= enabled:
                try:
                    write_raw(parent, "cgroup.subtree_control", wanted)
                except OSError:
                    for name in offered:
                        # One unavailable controller must not stop the others; a limit that needs it
                        # fails later, naming the file.
                        with contextlib.suppress(OSError):
                            write_raw(parent, "cgroup.subtree_control", f"+{name}")
            make_cgroup_dir(child)

    def clear_cpusets(self, keys: tuple[str, ...]) -> None:
        """``cpus`` and/or ``mems`` back to all of the parent's. Not an empty list, which would follow the parent
        for good: Linux 6.1 (the guest's) refuses to empty a populated cgroup's cpuset (ENOSPC)."""
        for key in keys:
            parent = (read_optional(self.path.parent, f"cpuset.{key}.effective") or "").strip()
            if parent:
                self._write(f"cpuset.{key}", parent)

    def _write(self, name: str, value: str) -> None:
        try:
            write_raw(self.path, name, value)
        except OSError as exc:
            controller = name.split(".", 1)[0]
            available = (read_optional(self.path, "cgroup.controllers") or "").split()
            if exc.errno in (errno.ENOENT, errno.EACCES) and controller != "cgroup" and controller not in available:
                raise CgroupError(f"cannot write {value!r} to {self.path / name}: the {controller} controller "
                                  f"is not enabled for this cgroup (parent's cgroup.subtree_control)") from exc
            raise CgroupError(f"cannot write {value!r} to {self.path / name}: {exc.strerror or exc}") from exc

    def apply(self, resources: Mapping[str, Any]) -> None:
        self.validate(resources)
        limit = (resources.get("pids") or {}).get("limit")
        if limit:
            self._write("pids.max", "max" if limit < 0 else str(limit))
        if resources.get("memory"):
            self._set_memory(resources["memory"])
        if resources.get("blockIO"):
            self._set_io(resources["blockIO"])
        cpu = resources.get("cpu") or {}
        if cpu:
            self._set_cpu(cpu)
        if resources.get("devices") is not None:
            self._set_devices(resources["devices"])
        for key, name in (("cpus", "cpuset.cpus"), ("mems", "cpuset.mems")):
            if cpu.get(key):
                self._write(name, cpu[key])
        for hugepage in resources.get("hugepageLimits") or []:
            prefix, value = f"hugetlb.{hugepage['pageSize']}", str(hugepage["limit"])
            self._write(f"{prefix}.max", value)
            if read_optional(self.path, f"{prefix}.rsvd.max") is not None:
                self._write(f"{prefix}.rsvd.max", value)
        for device, limits in (resources.get("rdma") or {}).items():
            parts = [f"{name}={limits[key]}" for key, name in (("hcaHandles", "hca_handle"),
                                                                ("hcaObjects", "hca_object")) if key in limits]
            if parts:
                self._write("rdma.max", " ".join([device, *parts]))
        for name, value in (resources.get("unified") or {}).items():
            self._write(name, value)

    def _set_memory(self, memory: Mapping[str, Any]) -> None:
        limit, swap = memory.get("limit") or 0, memory.get("swap") or 0
        if not (limit or swap or memory.get("reservation")):
            return
        if memory.get("checkBeforeUpdate") and limit > 0:
            usage = read_number(self.path, "memory.current")
            if usage > limit:
                raise CgroupError(f"memory.limit {limit} is below the cgroup's current usage {usage}")
        swap_max = v2_swap(swap, limit)
        swap_text = v2_limit(swap_max) or ("0" if swap > 0 else None)  # memory == memory+swap: no swap
        if swap_text is not None:
            try:
                write_raw(self.path, "memory.swap.max", swap_text)
            except OSError as exc:
                # Without swap accounting there is no file, and "no limit" or "no swap" needs none.
                if exc.errno != errno.ENOENT or swap_text not in ("max", "0"):
                    self._write("memory.swap.max", swap_text)
        for name, value in (("memory.max", limit), ("memory.low", memory.get("reservation") or 0)):
            text = v2_limit(value)
            if text is not None:
                self._write(name, text)

    def _set_io(self, block_io: Mapping[str, Any]) -> None:
        bfq = read_optional(self.path, "io.bfq.weight") is not None
        if block_io.get("weight"):
            weight = block_io["weight"]
            self._write(*(("io.bfq.weight", str(weight)) if bfq else ("io.weight", str(io_weight_from_blkio(weight)))))
        for device in block_io.get("weightDevice") or []:
            if device.get("weight"):
                weight = device["weight"] if bfq else io_weight_from_blkio(device["weight"])
                self._write("io.bfq.weight" if bfq else "io.weight", f"{device['major']}:{device['minor']} {weight}")
        for key, name in (("throttleReadBpsDevice", "rbps"), ("throttleWriteBpsDevice", "wbps"),
                          ("throttleReadIOPSDevice", "riops"), ("throttleWriteIOPSDevice", "wiops")):
            for device in block_io.get(key) or []:
                self._write("io.max", f"{device['major']}:{device['minor']} {name}={device['rate']}")

    def _set_cpu(self, cpu: Mapping[str, Any]) -> None:
        if cpu.get("shares"):
            self._write("cpu.weight", str(cpu_weight_from_shares(cpu["shares"])))
        if cpu.get("idle") is not None:
            self._write("cpu.idle", str(cpu["idle"]))
        quota, period = cpu.get("quota") or 0, cpu.get("period") or 0
        if quota or period:
            # As runc: a period alone sets the quota to "max".
            self._write("cpu.max", (str(quota) if quota > 0 else "max") + (f" {period}" if period else ""))
        if cpu.get("burst") is not None:
            self._write("cpu.max.burst", str(cpu["burst"]))

    def _set_devices(self, entries: list[Any]) -> None:
        """Attach the new filter before detaching the old ones: in between both apply, which only denies more."""
        program = _device_program(json.dumps(entries, sort_keys=True))
        try:
            directory = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise CgroupError(f"cannot open {self.path}: {exc.strerror}") from exc
        try:
            old = syscalls.bpf_device_filter_ids(directory)
            syscalls.bpf_attach_device_filter(directory, _loaded_program(program))
            for prog_id in old:
                old_fd = syscalls.bpf_program_fd(prog_id)
                try:
                    syscalls.bpf_detach_device_filter(directory, old_fd)
                finally:
                    os.close(old_fd)
        except OSError as exc:
            raise CgroupError(f"cannot set the device filter of {self.path}: {exc}") from exc
        finally:
            os.close(directory)

    def add(self, pid: int) -> None:
        add_process(self.path, pid)

    def pids(self) -> list[int]:
        return cgroup_pids(self.path)

    def freeze(self) -> None:
        self._set_frozen(True)

    def thaw(self) -> None:
        self._set_frozen(False)

    def _set_frozen(self, frozen: bool) -> None:
        """Write cgroup.freeze and wait (up to FREEZE_TIMEOUT) until cgroup.events says it holds."""
        write_value(self.path, "cgroup.freeze", "1" if frozen else "0")
        try:
            events = os.open(self.path / "cgroup.events", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise CgroupError(f"cannot open {self.path / 'cgroup.events'}: {exc.strerror}") from exc
        try:
            poller = select.poll()
            poller.register(events, select.POLLPRI)  # the kernel signals every change of cgroup.events
            deadline = time.monotonic() + FREEZE_TIMEOUT
            while True:
                text = os.pread(events, 4096, 0).decode()
                if f"frozen {int(frozen)}" in text.splitlines():
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                poller.poll(min(remaining, 0.1) * 1000)
        finally:
            os.close(events)
        if frozen:
            write_value(self.path, "cgroup.freeze", "0")
        raise CgroupError(f"{self.path} did not become {'frozen' if frozen else 'thawed'} "
                          f"within {FREEZE_TIMEOUT:g} s")

    def state(self) -> FreezerState:
        return "frozen" if (read_optional(self.path, "cgroup.freeze") or "0").strip() == "1" else "running"

    def stats(self) -> dict[str, Any]:
        """The ``data`` of ``runc events --stats``, as runc fills it from v2 files."""
        cpu = read_key_values(self.path, "cpu.stat")
        raw = read_key_values(self.path, "memory.stat")
        usage, limit = read_number(self.path, "memory.current"), read_number(self.path, "memory.max")
        swap_limit = read_number(self.path, "memory.swap.max")
        # v1 reports swap as memory+swap; runc adds the two up for v2 to match.
        swap = {"limit": swap_limit if swap_limit == UNLIMITED else swap_limit + limit,
                "usage": read_number(self.path, "memory.swap.current") + usage, "failcnt": 0}
        pid_count = read_number(self.path, "pids.current") if read_optional(self.path, "pids.current") else len(
            self.pids())
        pid_limit = read_number(self.path, "pids.max")
        memory: dict[str, Any] = {"cache": raw.get("file", 0),
                                  "usage": omit_zero({"limit": limit, "usage": usage, "failcnt": 0}, ("usage",)),
                                  "swap": omit_zero(swap, ("usage",)), "kernel": {"limit": 0, "failcnt": 0},
                                  "kernelTCP": {"limit": 0, "failcnt": 0}, "raw": raw}
        return {
            "cpu": {"usage": omit_zero({"total": cpu.get("usage_usec", 0) * 1000,
                                         "kernel": cpu.get("system_usec", 0) * 1000,
                                         "user": cpu.get("user_usec", 0) * 1000}, ("total",)),
                    "throttling": omit_zero({"periods": cpu.get("nr_periods", 0),
                                              "throttledPeriods": cpu.get("nr_throttled", 0),
                                              "throttledTime": cpu.get("throttled_usec", 0) * 1000})},
            "cpuset": {"cpu_exclusive": 0, "mem_hardwall": 0, "mem_exclusive": 0, "memory_migrate": 0,
                       "memory_spread_page": 0, "memory_spread_slab": 0, "memory_pressure": 0,
                       "sched_load_balance": 0, "sched_relax_domain_level": 0},
            "memory": omit_zero(memory, ("cache", "raw")),
            "pids": omit_zero({"current": pid_count, "limit": 0 if pid_limit == UNLIMITED else pid_limit}),
            "blkio": self._io_stats(),
            "hugetlb": self._hugetlb_stats(),
            "intel_rdt": {},
            "network_interfaces": None,
        }

    def _io_stats(self) -> dict[str, Any]:
        """io.stat ("8:0 rbytes=1 wbytes=2 rios=3 wios=4 ...") as runc's v1-shaped entries."""
        service_bytes: list[dict[str, Any]] = []
        serviced: list[dict[str, Any]] = []
        for line in (read_optional(self.path, "io.stat") or "").splitlines():
            device, *pairs = line.split()
            major, _, minor = device.partition(":")
            values = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
            for key, op, into in (("rbytes", "Read", service_bytes), ("wbytes", "Write", service_bytes),
                                  ("rios", "Read", serviced), ("wios", "Write", serviced)):
                if key in values:
                    into.append(omit_zero({"major": int(major), "minor": int(minor), "op": op,
                                            "value": int(values[key])}))
        return {key: entries for key, entries in (("ioServiceBytesRecursive", service_bytes),
                                                  ("ioServicedRecursive", serviced)) if entries}

    def _hugetlb_stats(self) -> dict[str, Any]:
        try:
            names = [entry.name for entry in self.path.iterdir()]
        except OSError:
            return {}
        sizes = sorted({name.split(".")[1] for name in names if name.startswith("hugetlb.") and
                        name.endswith(".current") and ".rsvd." not in name})
        return {size: omit_zero({"usage": read_number(self.path, f"hugetlb.{size}.current"),
                                  "max": read_number(self.path, f"hugetlb.{size}.max"),
                                  "failcnt": read_key_values(self.path, f"hugetlb.{size}.events").get("max", 0)},
                                 ("usage", "max"))
                for size in sizes}

    def kill_all(self, signal: int) -> None:
        if signal == signals.SIGKILL and (self.path / "cgroup.kill").exists():
            write_value(self.path, "cgroup.kill", "1")  # the kernel kills the whole subtree, forks included
            return
        signal_all(self, signal)

    def destroy(self) -> None:
        remove_cgroup_dir(self.path)

    def exists(self) -> bool:
        return self.path.is_dir()


@functools.lru_cache(maxsize=16)
def _device_program(entries_json: str) -> bytes:
    """The eBPF program for a rule list, built once per list: every container of a VM has the same rules,
    and building it in Python costs tens of milliseconds under emulation."""
    from micropod.runtime.cgroups_devices import DevicePolicy, device_filter_program, parse_device_rules

    return device_filter_program(DevicePolicy.from_rules(parse_device_rules(json.loads(entries_json))))


_loaded: dict[bytes, int] = {}


def _loaded_program(program: bytes) -> int:
    """The program loaded into the kernel once per process, its fd kept (close-on-exec, and closed in the
    runtime's forked children): the verifier's pass costs tens of milliseconds per container under emulation,
    and a long-lived caller (the guest agent) starts many containers with the same rules."""
    fd = _loaded.get(program)
    if fd is None:
        fd = _loaded[program] = syscalls.bpf_load_device_filter(program)
    return fd


def warm_up(parent: str | None = None) -> None:
    """At the agent's boot (so, in a boot snapshot, never again): the default rules' program built and loaded,
    and the containers' ``parent`` cgroup made with every controller enabled for its children, as each
    container's create would otherwise do (a write to the root's cgroup.subtree_control is slow)."""
    from micropod.runtime.cgroups_devices import container_device_rules

    _loaded_program(_device_program(json.dumps(container_device_rules(None, []), sort_keys=True)))
    if parent is not None and is_cgroup2(CGROUP_ROOT):
        with contextlib.suppress(OSError, CgroupError):  # if it fails, each container's create says why
            V2Cgroup(CGROUP_ROOT, CGROUP_ROOT / parent.strip("/") / "warm-up").create()
            remove_cgroup_dir(CGROUP_ROOT / parent.strip("/") / "warm-up")
