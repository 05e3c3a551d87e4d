"""Pods (issue 11's benchmark), both figures measured side by side in one run with one state root:

- adding a container to a running pod (`run -d --pod P hello sleep`) against `run -d hello sleep`, which boots
  a VM of its own (from the boot snapshot); goal 0.2x or less;
- the host memory per container: 10 containers in one pod against 10 single-container VMs, as the PSS of every
  monitor and VMM process involved, divided by 10.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

from bench.timing import comparison, demo_root, pss_kib, time_command

RUNS = int(os.environ.get("BENCH_RUNS", "7"))
DENSITY = int(os.environ.get("BENCH_POD_DENSITY", "10"))


def run() -> dict[str, Any]:
    with demo_root("pods") as demo:
        env, cli, root = demo.env, demo.cli, demo.tmp / "root"

        def micropod(*args: str) -> None:
            subprocess.run([*cli, *args], env=env, capture_output=True, timeout=300, check=True)

        time_command([*cli, "run", "--rm", "hello", "true"], env)  # the rootfs and the boot snapshot, once
        micropod("pod", "create", "--name", "bench", "--drive-pool", str(DENSITY))
        try:
            micropod("pod", "start", "bench")
            added, alone = [], []
            for index in range(RUNS):
                added.append(time_command([*cli, "run", "-d", "--pod", "bench", "--name", f"add{index}", "hello",
                                           "sleep", "3600"], env))
                micropod("rm", "-f", f"add{index}")
                alone.append(time_command([*cli, "run", "-d", "--name", f"alone{index}", "hello", "sleep", "3600"],
                                          env))
                micropod("rm", "-f", f"alone{index}")
            adding = comparison(("add_to_pod", added), ("run_new_vm", alone), goal=0.2)
            density = _density(micropod, root)
        finally:
            subprocess.run([*cli, "pod", "rm", "-f", "bench"], env=env, capture_output=True, timeout=300)
            ids = subprocess.run([*cli, "ps", "-aq"], env=env, capture_output=True, text=True).stdout.split()
            if ids:
                subprocess.run([*cli, "rm", "-f", *ids], env=env, capture_output=True, timeout=300)
    return {"add_container": adding, "memory_per_container": density}


def _density(micropod: Any, root: Path) -> dict[str, Any]:
    for index in range(DENSITY):
        micropod("run", "-d", "--pod", "bench", "--name", f"in-pod{index}", "hello", "sleep", "3600")
    with sqlite3.connect(root / "state.db") as db:
        pod_pids = [p for row in db.execute("SELECT monitor_pid, vmm_pid FROM pods") for p in row if p]
    in_pod = sum(pss_kib(pid) for pid in pod_pids) / DENSITY
    for index in range(DENSITY):
        micropod("run", "-d", "--name", f"vm{index}", "hello", "sleep", "3600")
    with sqlite3.connect(root / "state.db") as db:
        vm_pids = [p for row in db.execute("SELECT monitor_pid, vmm_pid FROM vms WHERE pod = ''") for p in row if p]
    per_vm = sum(pss_kib(pid) for pid in vm_pids) / DENSITY
    return {"containers": DENSITY, "in_one_pod_mib": round(in_pod / 1024, 1),
            "one_vm_each_mib": round(per_vm / 1024, 1), "ratio": round(in_pod / per_vm, 3)}

