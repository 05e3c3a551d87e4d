"""The cost of a confined VMM (issue 13's benchmark): `run --rm hello true` with QEMU as a uid of its own in its
jail (the default) against `--security-opt vmm-confinement=off`, interleaved in one run. Goal: under 10%."""

from __future__ import annotations

import os
from typing import Any

from bench.timing import comparison, demo_root, time_command

RUNS = int(os.environ.get("BENCH_RUNS", "7"))


def run() -> dict[str, Any]:
    with demo_root("confined") as root:
        env, cli = root.env, root.cli
        confined = [*cli, "run", "--rm", "hello", "true"]
        open_vmm = [*cli, "run", "--rm", "--security-opt", "vmm-confinement=off", "hello", "true"]
        time_command(confined, env)  # the rootfs and the boot snapshot, once for both
        time_command(open_vmm, env)
        ours, base = [], []
        for _ in range(RUNS):
            ours.append(time_command(confined, env))
            base.append(time_command(open_vmm, env))
    return comparison(("confined", ours), ("unconfined", base), goal=1.10)
