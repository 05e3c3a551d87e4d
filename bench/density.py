"""Density (issue 14): N idle VMs (`run -d hello sleep 3600`) for each N in BENCH_DENSITY (default 1,10,50).

At each N, in one run with one state root:
- the host memory per VM, two ways: the sum of PSS over every monitor and VMM, divided by N (PSS splits a page
  shared by k processes k ways, so the guest RAM that clones of one boot snapshot share counts once), and the
  drop of MemAvailable since before the first VM, divided by N (it also sees the snapshot's RAM in its holder,
  page tables and the kernel's own share);
- the wall time of the N-th `run -d`, and `micropod ps` latency with N VMs (median of 5);
- how many idle VMs fit: MemAvailable before the first VM over the marginal drop per VM between the last two N
  (a linear extrapolation, stated as such).
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import subprocess
from pathlib import Path
from typing import Any

from bench.timing import demo_root, pss_kib, time_command

COUNTS = [int(n) for n in os.environ.get("BENCH_DENSITY", "1,10,50").split(",")]
MIB = 1024


def run() -> dict[str, Any]:
    with demo_root("density") as demo:
        env, cli, root = demo.env, demo.cli, demo.tmp / "root"
        time_command([*cli, "run", "--rm", "hello", "true"], env)  # the rootfs and the boot snapshot, once
        before = _mem_available_kib()
        points: list[dict[str, Any]] = []
        started = 0
        try:
            for count in COUNTS:
                last = 0.0
                while started < count:
                    last = time_command([*cli, "run", "-d", "--name", f"idle{started}", "hello", "sleep", "3600"],
                                        env)
                    started += 1
                ps = [time_command([*cli, "ps"], env) for _ in range(5)]
                pss = _pss_per_vm_kib(root, count)
                drop = (before - _mem_available_kib()) / count
                points.append({"vms": count, "pss_per_vm_mib": round(pss["total"] / MIB, 1),
                               "monitor_pss_mib": round(pss["monitor"] / MIB, 1),
                               "vmm_pss_mib": round(pss["vmm"] / MIB, 1),
                               "mem_available_drop_per_vm_mib": round(drop / MIB, 1),
                               "nth_start_s": round(last, 3), "ps_median_s": round(statistics.median(ps), 3),
                               "ps_samples_s": [round(s, 3) for s in ps]})
        finally:
            ids = subprocess.run([*cli, "ps", "-aq"], env=env, capture_output=True, text=True).stdout.split()
            if ids:
                subprocess.run([*cli, "rm", "-f", *ids], env=env, capture_output=True, timeout=600)
    return {"points": points, "fit": _fit(points, before), "target_mib_per_vm": 30, "goal_mib_per_vm": 15,
            "monitor_target_mib": 8, "monitor_goal_mib": 4}


def _fit(points: list[dict[str, Any]], available_kib: int) -> dict[str, Any]:
    if len(points) < 2:
        return {}
    low, high = points[-2], points[-1]
    marginal = ((high["mem_available_drop_per_vm_mib"] * high["vms"] - low["mem_available_drop_per_vm_mib"]
                 * low["vms"]) / (high["vms"] - low["vms"]))
    return {"method": f"MemAvailable before the first VM over the marginal MemAvailable drop per VM between "
                      f"{low['vms']} and {high['vms']} VMs (linear extrapolation; CPU is not counted)",
            "marginal_mib_per_vm": round(marginal, 1), "mem_available_before_mib": available_kib // MIB,
            "idle_vms_that_fit": int(available_kib / MIB / marginal) if marginal > 0 else None}


def _pss_per_vm_kib(root: Path, count: int) -> dict[str, float]:
    with sqlite3.connect(root / "state.db") as db:
        rows = list(db.execute("SELECT monitor_pid, vmm_pid FROM vms WHERE pod = ''"))
    monitor = sum(pss_kib(m) for m, _ in rows if m) / count
    vmm = sum(pss_kib(v) for _, v in rows if v) / count
    return {"monitor": monitor, "vmm": vmm, "total": monitor + vmm}


def _mem_available_kib() -> int:
    text = Path("/proc/meminfo").read_text()
    return next(int(line.split()[1]) for line in text.splitlines() if line.startswith("MemAvailable:"))
