"""The cgroup v1 manager: one directory per controller hierarchy, written as runc 1.1's fs driver does.

A controller the host does not mount is skipped, unless the config asks for one of its limits: then
``apply`` fails and names it. The devices controller is required: without it a container could open
any device node.

Standard library only.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from micropod.errors import CgroupError, SpecError
from micropod.runtime.cgroups import (
    FREEZE_TIMEOUT,
    UNLIMITED,
    FreezerState,
    add_process,
    cgroup_pids,
    make_cgroup_dir,
    omit_zero,
    read_key_values,
    read_number,
    read_optional,
    read_value,
    remove_cgroup_dir,
    signal_all,
    validate_resources,
    write_raw,
    write_value,
)

_CLOCK_TICKS = 100  # USER_HZ, the unit of cpuacct.stat
_BLKIO_FILES = {  # stats key -> file suffix, read from the first of CFQ's, BFQ's and the throttle files
    "ioServiceBytesRecursive": "io_service_bytes_recursive",
    "ioServicedRecursive": "io_serviced_recursive",
}


class V1Cgroup:
    def __init__(self, paths: Mapping[str, Path]) -> None:
        self._paths = dict(paths)

    def paths(self) -> dict[str, str]:
        return {name: str(path) for name, path in self._paths.items()}

    def _dirs(self) -> list[Path]:
        return list(dict.fromkeys(self._paths.values()))

    def _dir(self, controller: str, field: str) -> Path:
        path = self._paths.get(controller)
        if path is None:
            raise CgroupError(f"cannot set {field}: the {controller} cgroup controller is not mounted")
        return path

    def validate(self, resources: Mapping[str, Any], field: str = "linux.resources") -> None:
        validate_resources(resources, field)
        if resources.get("unified"):
            raise SpecError(f"{field}.unified", "needs cgroup v2, and this host's cgroups are v1")

    def create(self) -> None:
        for path in self._dirs():
            make_cgroup_dir(path)
        if "cpuset" in self._paths:
            _inherit_cpuset(self._paths["cpuset"])

    def apply(self, resources: Mapping[str, Any]) -> None:
        """Write the limits. Call it before ``add`` when realtime CPU time is asked for: a realtime task
        cannot join a cgroup without an RT budget."""
        self.validate(resources)
        field = "linux.resources"
        cpu = resources.get("cpu") or {}
        for key, name in (("cpus", "cpuset.cpus"), ("mems", "cpuset.mems")):
            if cpu.get(key):
                write_value(self._dir("cpuset", f"{field}.cpu.{key}"), name, cpu[key])
        if resources.get("devices") is not None:
            self._set_devices(resources["devices"])
        if resources.get("memory"):
            self._set_memory(resources["memory"])
        if cpu:
            self._set_cpu(cpu)
        limit = (resources.get("pids") or {}).get("limit")
        if limit:
            write_value(self._dir("pids", f"{field}.pids"), "pids.max", "max" if limit < 0 else str(limit))
        if resources.get("blockIO"):
            self._set_blkio(resources["blockIO"])
        for hugepage in resources.get("hugepageLimits") or []:
            path = self._dir("hugetlb", f"{field}.hugepageLimits")
            prefix, value = f"hugetlb.{hugepage['pageSize']}", str(hugepage["limit"])
            write_value(path, f"{prefix}.limit_in_bytes", value)
            if read_optional(path, f"{prefix}.rsvd.limit_in_bytes") is not None:
                write_value(path, f"{prefix}.rsvd.limit_in_bytes", value)
        network = resources.get("network") or {}
        if network.get("classID"):
            write_value(self._dir("net_cls", f"{field}.network"), "net_cls.classid", str(network["classID"]))
        for priority in network.get("priorities") or []:
            write_value(self._dir("net_prio", f"{field}.network"), "net_prio.ifpriomap",
                        f"{priority['name']} {priority['priority']}")
        for device, limits in (resources.get("rdma") or {}).items():
            parts = [f"{name}={limits[key]}" for key, name in (("hcaHandles", "hca_handle"),
                                                                ("hcaObjects", "hca_object")) if key in limits]
            if parts:
                write_value(self._dir("rdma", f"{field}.rdma"), "rdma.max", " ".join([device, *parts]))

    def _set_devices(self, entries: list[Any]) -> None:
        from micropod.runtime.cgroups_devices import DevicePolicy, parse_device_rules

        path = self._dir("devices", "linux.resources.devices")
        target = DevicePolicy.from_rules(parse_device_rules(entries))
        for rule in DevicePolicy.from_v1_list(read_value(path, "devices.list")).transition(target):
            write_value(path, "devices.allow" if rule.allow else "devices.deny", rule.cgroup_v1_line())
        # The kernel keeps what it accepted; make sure that is what was asked for.
        now = DevicePolicy.from_v1_list(read_value(path, "devices.list"))
        if now.default_allow != target.default_allow or (not target.default_allow and now != target):
            raise CgroupError(f"{path / 'devices.list'} does not match the requested device rules")

    def _set_memory(self, memory: Mapping[str, Any]) -> None:
        path = self._dir("memory", "linux.resources.memory")
        limit, swap = memory.get("limit") or 0, memory.get("swap") or 0
        if limit == -1 and swap == 0 and read_optional(path, "memory.memsw.limit_in_bytes") is not None:
            swap = -1  # unlimited memory means unlimited swap too, unless the config says otherwise
        # memsw must stay >= the memory limit at every step, so the order depends on the direction.
        if limit and swap and (swap == -1 or read_number(path, "memory.limit_in_bytes") < swap):
            order = [("memory.memsw.limit_in_bytes", swap), ("memory.limit_in_bytes", limit)]
        else:
            order = [("memory.limit_in_bytes", limit), ("memory.memsw.limit_in_bytes", swap)]
        for name, value in order:
            if value:
                self._write_memory_limit(path, name, value)
        if memory.get("reservation"):
            write_value(path, "memory.soft_limit_in_bytes", str(memory["reservation"]))
        if memory.get("disableOOMKiller"):
            write_value(path, "memory.oom_control", "1")
        if memory.get("swappiness") is not None:
            write_value(path, "memory.swappiness", str(memory["swappiness"]))

    @staticmethod
    def _write_memory_limit(path: Path, name: str, value: int) -> None:
        try:
            write_raw(path, name, str(value))
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise CgroupError(f"cannot set {path / name} to {value}: the cgroup already uses "
                                  f"{read_number(path, 'memory.usage_in_bytes')} bytes (peak "
                                  f"{read_number(path, 'memory.max_usage_in_bytes')})") from exc
            raise CgroupError(f"cannot write {value} to {path / name}: {exc.strerror or exc}") from exc

    def _set_cpu(self, cpu: Mapping[str, Any]) -> None:
        keys = ("shares", "quota", "period", "burst", "realtimeRuntime", "realtimePeriod", "idle")
        if not any(cpu.get(key) for key in keys) and cpu.get("idle") is None:
            return
        path = self._dir("cpu", "linux.resources.cpu")
        _write_pair(path, ("cpu.rt_period_us", cpu.get("realtimePeriod")),
                    ("cpu.rt_runtime_us", cpu.get("realtimeRuntime")))
        if cpu.get("shares"):
            write_value(path, "cpu.shares", str(cpu["shares"]))
            actual = read_number(path, "cpu.shares")
            if actual != cpu["shares"]:
                bound = "maximum" if cpu["shares"] > actual else "minimum"
                raise CgroupError(f"the {bound} allowed cpu-shares is {actual}")
        _write_pair(path, ("cpu.cfs_period_us", cpu.get("period")), ("cpu.cfs_quota_us", cpu.get("quota")))
        if cpu.get("burst") is not None:
            write_value(path, "cpu.cfs_burst_us", str(cpu["burst"]))
        if cpu.get("idle") is not None:
            write_value(path, "cpu.idle", str(cpu["idle"]))

    def _set_blkio(self, block_io: Mapping[str, Any]) -> None:
        path = self._dir("blkio", "linux.resources.blockIO")
        bfq = read_optional(path, "blkio.bfq.weight") is not None
        weight_file = "blkio.bfq.weight" if bfq else "blkio.weight"
        if block_io.get("weight"):
            write_value(path, weight_file, str(block_io["weight"]))
        if block_io.get("leafWeight"):
            write_value(path, "blkio.leaf_weight", str(block_io["leafWeight"]))
        for device in block_io.get("weightDevice") or []:
            where = f"{device['major']}:{device['minor']}"
            if device.get("weight"):
                write_value(path, f"{weight_file}_device", f"{where} {device['weight']}")
            if device.get("leafWeight"):
                write_value(path, "blkio.leaf_weight_device", f"{where} {device['leafWeight']}")
        for key, name in (("throttleReadBpsDevice", "read_bps_device"), ("throttleWriteBpsDevice", "write_bps_device"),
                          ("throttleReadIOPSDevice", "read_iops_device"),
                          ("throttleWriteIOPSDevice", "write_iops_device")):
            for device in block_io.get(key) or []:
                write_value(path, f"blkio.throttle.{name}", f"{device['major']}:{device['minor']} {device['rate']}")

    def add(self, pid: int) -> None:
        for path in self._dirs():
            add_process(path, pid)

    def pids(self) -> list[int]:
        for controller in ("pids", "freezer", "devices", "memory", "cpu"):
            if controller in self._paths:
                return cgroup_pids(self._paths[controller])
        return cgroup_pids(self._dirs()[0])

    def freeze(self) -> None:
        """FROZEN, checked: a v1 freeze can stall in FREEZING while tasks fork, so (as runc) it is retried,
        thawing now and then, until FREEZE_TIMEOUT; if it never holds, the cgroup is thawed again."""
        path = self._dir("freezer", "pause")
        deadline = time.monotonic() + FREEZE_TIMEOUT
        attempt, state = 0, "FREEZING"
        while time.monotonic() < deadline:
            attempt += 1
            if attempt % 50 == 0:
                write_value(path, "freezer.state", "THAWED")
                time.sleep(0.01)
            write_value(path, "freezer.state", "FROZEN")
            state = read_value(path, "freezer.state")
            if state == "FROZEN":
                return
            if state != "FREEZING":
                break
            time.sleep(min(0.0001 * attempt, 0.01))
        write_value(path, "freezer.state", "THAWED")
        raise CgroupError(f"cannot freeze {path}: it stayed {state}")

    def thaw(self) -> None:
        if "freezer" in self._paths:
            write_value(self._paths["freezer"], "freezer.state", "THAWED")

    def state(self) -> FreezerState:
        path = self._paths.get("freezer")
        if path is None or read_optional(path, "freezer.self_freezing") in (None, "0\n"):
            return "running"
        return "frozen"

    def stats(self) -> dict[str, Any]:
        """The ``data`` of ``runc events --stats``, field for field (omitted where runc omits zeros)."""
        cpu_dir, acct, mem = self._paths.get("cpu"), self._paths.get("cpuacct"), self._paths.get("memory")
        usage: dict[str, Any] = {"kernel": 0, "user": 0}
        if acct is not None:
            percpu_kernel, percpu_user = _percpu_modes(read_optional(acct, "cpuacct.usage_all"))
            ticks = read_key_values(acct, "cpuacct.stat")
            usage = {"total": read_number(acct, "cpuacct.usage"),
                     "percpu": _numbers(read_optional(acct, "cpuacct.usage_percpu")),
                     "percpu_kernel": percpu_kernel, "percpu_user": percpu_user,
                     "kernel": ticks.get("system", 0) * 1_000_000_000 // _CLOCK_TICKS,
                     "user": ticks.get("user", 0) * 1_000_000_000 // _CLOCK_TICKS}
        throttled = read_key_values(cpu_dir, "cpu.stat") if cpu_dir is not None else {}
        memory: dict[str, Any] = {}
        if mem is not None:
            raw = read_key_values(mem, "memory.stat")
            memory = {"cache": raw.get("cache", 0), "usage": _memory_entry(mem, "memory"),
                      "swap": _memory_entry(mem, "memory.memsw"), "kernel": _memory_entry(mem, "memory.kmem"),
                      "kernelTCP": _memory_entry(mem, "memory.kmem.tcp"), "raw": raw}
        pids_dir = self._paths.get("pids")
        pids = {} if pids_dir is None else {"current": read_number(pids_dir, "pids.current"),
                                            "limit": read_number(pids_dir, "pids.max")}
        return {
            "cpu": {"usage": omit_zero(usage, ("total", "percpu", "percpu_kernel", "percpu_user")),
                    "throttling": omit_zero({"periods": throttled.get("nr_periods", 0),
                                              "throttledPeriods": throttled.get("nr_throttled", 0),
                                              "throttledTime": throttled.get("throttled_time", 0)})},
            "cpuset": self._cpuset_stats(),
            "memory": omit_zero(memory, ("cache", "raw")),
            "pids": omit_zero({key: 0 if value == UNLIMITED else value for key, value in pids.items()}),
            "blkio": self._blkio_stats(),
            "hugetlb": self._hugetlb_stats(),
            "intel_rdt": {},
            "network_interfaces": None,
        }

    def _cpuset_stats(self) -> dict[str, Any]:
        path = self._paths.get("cpuset")
        if path is None:
            return {}
        stats: dict[str, Any] = {"cpus": _cpu_list(read_optional(path, "cpuset.cpus"))}
        names = ("cpu_exclusive", "mems", "mem_hardwall", "mem_exclusive", "memory_migrate", "memory_spread_page",
                 "memory_spread_slab", "memory_pressure", "sched_load_balance", "sched_relax_domain_level")
        for name in names:
            if name == "mems":
                stats["mems"] = _cpu_list(read_optional(path, "cpuset.mems"))
            else:
                stats[name] = read_number(path, f"cpuset.{name}")
        return omit_zero(stats, ("cpus", "mems"))

    def _blkio_stats(self) -> dict[str, Any]:
        path = self._paths.get("blkio")
        if path is None:
            return {}
        for prefix in ("blkio.", "blkio.bfq.", "blkio.throttle."):
            texts = {key: read_optional(path, prefix + suffix) for key, suffix in _BLKIO_FILES.items()}
            if any(text is not None for text in texts.values()):
                found = {key: _blkio_entries(text) for key, text in texts.items()}
                return {key: entries for key, entries in found.items() if entries}
        return {}

    def _hugetlb_stats(self) -> dict[str, Any]:
        path = self._paths.get("hugetlb")
        if path is None:
            return {}
        sizes = sorted({name.split(".")[1] for name in _listdir(path) if name.endswith(".usage_in_bytes")})
        return {size: omit_zero({"usage": read_number(path, f"hugetlb.{size}.usage_in_bytes"),
                                  "max": read_number(path, f"hugetlb.{size}.max_usage_in_bytes"),
                                  "failcnt": read_number(path, f"hugetlb.{size}.failcnt")}, ("usage", "max"))
                for size in sizes}

    def kill_all(self, signal: int) -> None:
        signal_all(self, signal)

    def destroy(self) -> None:
        failures = []
        for path in self._dirs():
            try:
                remove_cgroup_dir(path)
            except CgroupError as exc:
                failures.append(str(exc))
        if failures:
            raise CgroupError("; ".join(failures))

    def exists(self) -> bool:
        return any(path.is_dir() for path in self._dirs())


def _write_pair(path: Path, first: tuple[str, int | None], second: tuple[str, int | None]) -> None:
    """A period and its budget: the kernel may refuse the new period until the budget fits it, so on
    EINVAL write the budget first and the period after (runc's order)."""
    (period_file, period), (budget_file, budget) = first, second
    retry = False
    if period:
        try:
            write_raw(path, period_file, str(period))
        except OSError as exc:
            if exc.errno != errno.EINVAL or not budget:
                raise CgroupError(f"cannot write {period} to {path / period_file}: {exc.strerror}") from exc
            retry = True
    if budget:
        write_value(path, budget_file, str(budget))
    if retry:
        write_value(path, period_file, str(period))


def _inherit_cpuset(leaf: Path) -> None:
    """A new cpuset cgroup starts with no CPUs and no memory nodes, and refuses tasks until it has some:
    copy them down from the nearest ancestor that has them."""
    chain = [leaf, *leaf.parents]
    for index, path in enumerate(chain):
        if read_optional(path, "cpuset.cpus") is None:
            return
        if read_value(path, "cpuset.cpus") and read_value(path, "cpuset.mems"):
            for child in reversed(chain[:index]):
                for name in ("cpuset.cpus", "cpuset.mems"):
                    if not read_value(child, name):
                        write_value(child, name, read_value(child.parent, name))
            return


def _listdir(path: Path) -> list[str]:
    try:
        return [entry.name for entry in path.iterdir()]
    except OSError:
        return []


def _numbers(text: str | None) -> list[int]:
    return [int(value) for value in (text or "").split()]


def _percpu_modes(text: str | None) -> tuple[list[int], list[int]]:
    """cpuacct.usage_all: a header, then "cpu user system" per CPU."""
    rows = [line.split() for line in (text or "").splitlines()[1:] if len(line.split()) == 3]
    return [int(row[2]) for row in rows], [int(row[1]) for row in rows]


def _cpu_list(text: str | None) -> list[int]:
    """"0-2,5" to [0, 1, 2, 5]."""
    found: list[int] = []
    for part in (text or "").strip().split(","):
        if part:
            low, _, high = part.partition("-")
            found.extend(range(int(low), int(high or low) + 1))
    return found


def _memory_entry(path: Path, prefix: str) -> dict[str, int]:
    entry = {"limit": read_number(path, f"{prefix}.limit_in_bytes"),
             "usage": read_number(path, f"{prefix}.usage_in_bytes"),
             "max": read_number(path, f"{prefix}.max_usage_in_bytes"),
             "failcnt": read_number(path, f"{prefix}.failcnt")}
    return omit_zero(entry, ("usage", "max"))


def _blkio_entries(text: str | None) -> list[dict[str, Any]]:
    entries = []
    for line in (text or "").splitlines():
        fields = line.split()
        if len(fields) == 3 and ":" in fields[0]:
            major, minor = fields[0].split(":")
            entries.append(omit_zero({"major": int(major), "minor": int(minor), "op": fields[1],
                                       "value": int(fields[2])}))
    return entries

