"""What micropod-runtime adds inside the VM: `micropod run --rm hello true` with every container going through
the runtime (the default), against the agent's old chroot path (MICROPOD_BENCH_CHROOT_AGENT=1, a
benchmark-only switch the host puts on the kernel command line), interleaved in one run, both resuming their
own boot snapshot. The issue's bound: no more than 1.10."""

from __future__ import annotations

import os
from typing import Any

from bench.timing import comparison, demo_root, time_command

RUNS = int(os.environ.get("BENCH_RUNS", "7"))


def run() -> dict[str, Any]:
    from micropod.vmm.factory import CHROOT_AGENT_ENV

    with demo_root("inguest") as root:
        env, cli = root.env, root.cli
        chroot_env = dict(env, **{CHROOT_AGENT_ENV: "1"})
        run_true = [*cli, "run", "--rm", "hello", "true"]
        time_command(run_true, env)  # each variant builds its boot snapshot once
        time_command(run_true, chroot_env)
        runtime, chroot = [], []
        for _ in range(RUNS):
            runtime.append(time_command(run_true, env))
            chroot.append(time_command(run_true, chroot_env))
    return comparison(("through_runtime", runtime), ("chroot", chroot), bound=1.10)
