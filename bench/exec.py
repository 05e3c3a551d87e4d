"""Exec latency: `micropod exec ID true` into a running VM against `micropod run --rm hello true`,
both measured in the same run with the same state root.
"""

from __future__ import annotations

import os
from typing import Any

from bench.timing import comparison, demo_root, median_of, time_command

RUNS = int(os.environ.get("BENCH_RUNS", "7"))


def run() -> dict[str, Any]:
    import subprocess

    with demo_root("exec") as root:
        env, cli = root.env, root.cli
        run_true = [*cli, "run", "--rm", "hello", "true"]
        time_command(run_true, env)  # builds the rootfs and the boot snapshot once
        time_command([*cli, "run", "-d", "--name", "bench-exec", "hello", "sleep", "3600"], env)
        try:
            exec_true = [*cli, "exec", "bench-exec", "true"]
            time_command(exec_true, env)
            _, exec_samples = median_of(RUNS, exec_true, env)
            _, run_samples = median_of(RUNS, run_true, env)
        finally:
            subprocess.run([*cli, "rm", "-f", "bench-exec"], env=env, capture_output=True, timeout=120)
    return comparison(("micropod_exec", exec_samples), ("micropod_run", run_samples))
