"""The guest's counters for ``docker stats``; the host turns two samples into rates."""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def guest_stats() -> dict[str, Any]:
    with open("/proc/stat", "rb") as file:
        cpu = [int(v) for v in file.readline().split()[1:]]
    meminfo: dict[str, int] = {}
    with open("/proc/meminfo", "rb") as file:
        for line in file:
            key, _, rest = line.partition(b":")
            meminfo[key.decode()] = int(rest.split()[0]) * 1024
    read_bytes = write_bytes = 0
    for name in os.listdir("/sys/block"):
        if name.startswith(("loop", "ram", "zram")):
            continue
        try:
            with open(f"/sys/block/{name}/stat", "rb") as file:
                fields = file.read().split()
        except OSError:
            continue
        read_bytes += int(fields[2]) * 512
        write_bytes += int(fields[6]) * 512
    pids = sum(1 for entry in os.listdir("/proc") if entry.isdigit() and _is_user_process(entry))
    net_rx, net_tx = _net_bytes()
    return {
        "cpu_total": sum(cpu[:8]), "cpu_idle": cpu[3] + cpu[4], "cpus": os.cpu_count() or 1,
        "mem_total": meminfo.get("MemTotal", 0),
        "mem_used": meminfo.get("MemTotal", 0) - meminfo.get("MemAvailable", meminfo.get("MemFree", 0)),
        "block_read": read_bytes, "block_write": write_bytes, "pids": max(0, pids - 1),  # not the agent
        "net_rx": net_rx, "net_tx": net_tx,
    }


def _net_bytes() -> tuple[int, int]:
    """Bytes received and sent on every interface but loopback, as docker's NET I/O counts them."""
    rx = tx = 0
    with open("/proc/net/dev", "rb") as file:
        for line in file.readlines()[2:]:
            name, _, counters = line.partition(b":")
            if name.strip() != b"lo":
                fields = counters.split()
                rx, tx = rx + int(fields[0]), tx + int(fields[8])
    return rx, tx


def _is_user_process(pid: str) -> bool:
    """Kernel threads have an empty command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return bool(file.read(1))
    except OSError:
        return False


def container_stats(cid: str) -> dict[str, Any]:
    """A pod's container's share, from its own cgroup: its CPU time counted against the VM's (as idle the
    rest), its memory and its limit, its block I/O and its processes; the network is the pod's."""
    from pathlib import Path

    from micropod.agent.bundle import CGROUP_PARENT
    from micropod.runtime.cgroups import UNLIMITED, read_key_values, read_number

    vm = guest_stats()
    group = Path(f"/sys/fs/cgroup{CGROUP_PARENT}/{cid}")
    usage_ticks = read_key_values(group, "cpu.stat").get("usage_usec", 0) // 10_000  # USER_HZ, as /proc/stat
    limit = read_number(group, "memory.max")
    read_bytes = write_bytes = 0
    try:
        with open(group / "io.stat", "rb") as file:
            for line in file:
                counters = dict(word.split(b"=", 1) for word in line.split()[1:] if b"=" in word)
                read_bytes += int(counters.get(b"rbytes", 0))
                write_bytes += int(counters.get(b"wbytes", 0))
    except OSError:
        pass
    return {
        **vm, "cpu_idle": max(0, vm["cpu_total"] - usage_ticks),
        "mem_used": read_number(group, "memory.current"),
        "mem_total": limit if limit not in (0, UNLIMITED) else vm["mem_total"],
        "block_read": read_bytes, "block_write": write_bytes,
        "pids": read_number(group, "pids.current"),
    }
