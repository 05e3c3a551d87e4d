"""Boot ratio: `micropod run --rm hello true` against a bare QEMU microvm boot of the same kernel
whose minimal init powers off at once, under the same accelerator, in one run.

Three ratios: the default (a container's first boot resumes the snapshot taken with its image's root ready,
micropod/vmm/rootsnap.py), the machine shape's boot snapshot alone (MICROPOD_ROOT_SNAPSHOTS=0: the agent mounts
the root itself, micropod/vmm/snapshot.py), and a cold boot (MICROPOD_SNAPSHOTS=0), which boots the kernel and
starts the guest agent every time.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.timing import median_of, time_command

RUNS = int(os.environ.get("BENCH_RUNS", "7"))


def run() -> dict[str, Any]:
    from micropod.guest.artefacts import locate
    from micropod.guest.build import baseline_root, qemu_baseline_argv
    from micropod.image.demo import build_demo_image
    from micropod.vmm.accel import choose_accel

    guest = locate()
    with tempfile.TemporaryDirectory(prefix="micropod-bench-") as tmp:
        env = dict(os.environ, MICROPOD_ROOT=str(Path(tmp) / "root"), MICROPOD_SNAPSHOT_DIR=str(Path(tmp) / "snap"),
                   MICROPOD_NETWORK="none")
        cold_env = dict(env, MICROPOD_SNAPSHOTS="0")
        boot_env = dict(env, MICROPOD_ROOT_SNAPSHOTS="0")
        cli = [sys.executable, "-m", "micropod"]
        run_true = [*cli, "run", "--rm", "hello", "true"]
        archive = build_demo_image(Path(tmp) / "hello.oci.tar")
        time_command([*cli, "load", "-q", "-i", str(archive)], env)
        first_run = time_command(run_true, env)  # builds the rootfs and the root-ready snapshot once
        time_command(run_true, boot_env)  # and the machine shape's boot snapshot
        bare_argv = qemu_baseline_argv(guest.kernel, baseline_root())
        time_command(bare_argv)
        bare, bare_samples = median_of(RUNS, bare_argv)
        warm, warm_samples = median_of(RUNS, run_true, env)
        boot_only, boot_samples = median_of(RUNS, run_true, boot_env)
        cold, cold_samples = median_of(RUNS, run_true, cold_env)
    return {
        "accel": choose_accel(),
        "runs": RUNS,
        "bare_qemu_boot_median_s": round(bare, 3),
        "micropod_run_median_s": round(warm, 3),
        "ratio": round(warm / bare, 3),
        "micropod_run_boot_snapshot_only_median_s": round(boot_only, 3),
        "ratio_boot_snapshot_only": round(boot_only / bare, 3),
        "micropod_run_cold_boot_median_s": round(cold, 3),
        "ratio_cold_boot": round(cold / bare, 3),
        "first_run_with_snapshot_build_s": round(first_run, 3),
        "target": 0.5,  # issue 14's (issue 9's were 2.0 and 1.3)
        "goal": 0.25,
        "samples": {
            "bare_qemu": [round(s, 3) for s in bare_samples],
            "micropod_run": [round(s, 3) for s in warm_samples],
            "micropod_run_boot_snapshot_only": [round(s, 3) for s in boot_samples],
            "micropod_run_cold_boot": [round(s, 3) for s in cold_samples],
        },
    }
