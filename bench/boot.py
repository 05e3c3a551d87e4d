"""Boot ratio: `micropod run --rm hello true` against a bare QEMU microvm boot of the same kernel
whose minimal init powers off at once, both under the same accelerator, in one run."""

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
    from micropod.guest.baseline import baseline_root, qemu_baseline_argv
    from micropod.image.demo import build_demo_image
    from micropod.vmm.accel import choose_accel

    guest = locate()
    with tempfile.TemporaryDirectory(prefix="micropod-bench-") as tmp:
        env = dict(os.environ, MICROPOD_ROOT=str(Path(tmp) / "root"))
        cli = [sys.executable, "-m", "micropod"]
        archive = build_demo_image(Path(tmp) / "hello.oci.tar")
        time_command([*cli, "load", "-q", "-i", str(archive)], env)
        time_command([*cli, "run", "--rm", "hello", "true"], env)  # warm: builds the rootfs once
        bare_argv = qemu_baseline_argv(guest.kernel, baseline_root())
        time_command(bare_argv)
        bare, bare_samples = median_of(RUNS, bare_argv)
        full, full_samples = median_of(RUNS, [*cli, "run", "--rm", "hello", "true"], env)
    return {
        "accel": choose_accel(),
        "runs": RUNS,
        "micropod_run_median_s": round(full, 3),
        "bare_qemu_boot_median_s": round(bare, 3),
        "ratio": round(full / bare, 3),
        "target": 2.0,
        "goal": 1.3,
        "samples": {"micropod_run": [round(s, 3) for s in full_samples],
                    "bare_qemu": [round(s, 3) for s in bare_samples]},
    }
