"""Wall-clock timing of whole commands, repeated, reported as medians."""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence


def time_command(argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 300) -> float:
    start = time.perf_counter()
    done = subprocess.run(list(argv), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.decode(errors='replace')[-500:]}")
    return elapsed


def median_of(runs: int, argv: Sequence[str], env: Mapping[str, str] | None = None) -> tuple[float, list[float]]:
    samples = [time_command(argv, env) for _ in range(runs)]
    return statistics.median(samples), samples
