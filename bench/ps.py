"""`micropod ps` with 10 running VMs (issue 14's benchmark), as an absolute median and against `python3 -c pass`,
the floor of any Python command, measured in the same run. Target 100 ms, goal 60 ms."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from typing import Any

from bench.timing import comparison, demo_root, median_of, time_command

RUNS = int(os.environ.get("BENCH_RUNS", "15"))
VMS = int(os.environ.get("BENCH_PS_VMS", "10"))


def run() -> dict[str, Any]:
    with demo_root("ps") as root:
        env, cli = root.env, root.cli
        try:
            for index in range(VMS):
                time_command([*cli, "run", "-d", "--name", f"idle{index}", "hello", "sleep", "3600"], env)
            time_command([*cli, "ps"], env)
            _, ps_samples = median_of(RUNS, [*cli, "ps"], env)
            _, floor = median_of(RUNS, [sys.executable, "-c", "pass"], env)
        finally:
            ids = subprocess.run([*cli, "ps", "-aq"], env=env, capture_output=True, text=True).stdout.split()
            if ids:
                subprocess.run([*cli, "rm", "-f", *ids], env=env, capture_output=True, timeout=300)
    return comparison(("ps", ps_samples), ("python_pass", floor), vms=VMS,
                      target_s=0.100, goal_s=0.060, ps_median_ms=round(statistics.median(ps_samples) * 1000, 1))
