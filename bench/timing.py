"""Wall-clock timing of whole commands, repeated, reported as medians."""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def compile_sources() -> None:
    """Every command timed runs from bytecode, as an installed micropod does: compiled once here, and no
    PYTHONDONTWRITEBYTECODE of the caller's makes each run compile its modules again."""
    import compileall
    import os
    from pathlib import Path

    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    compileall.compile_dir(Path(__file__).resolve().parent.parent / "micropod", quiet=2)


@dataclass(frozen=True)
class DemoRoot:
    """A throwaway state root holding the demo image, with networking off: its environment and the CLI."""

    env: dict[str, str]
    cli: list[str]
    tmp: Path


@contextlib.contextmanager
def demo_root(name: str) -> Iterator[DemoRoot]:
    """The state root (and snapshot cache) of one benchmark, removed afterwards."""
    import os
    import sys
    import tempfile

    from micropod.image.demo import build_demo_image

    with tempfile.TemporaryDirectory(prefix=f"micropod-bench-{name}-") as tmp_name:
        tmp = Path(tmp_name)
        env = dict(os.environ, MICROPOD_ROOT=str(tmp / "root"), MICROPOD_SNAPSHOT_DIR=str(tmp / "snap"),
                   MICROPOD_NETWORK="none")
        cli = [sys.executable, "-m", "micropod"]
        time_command([*cli, "load", "-q", "-i", str(build_demo_image(tmp / "hello.oci.tar"))], env)
        yield DemoRoot(env, cli, tmp)


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


def comparison(ours: tuple[str, Sequence[float]], baseline: tuple[str, Sequence[float]], unit: str = "s",
               digits: int = 3, **extra: Any) -> dict[str, Any]:
    """A figure as every benchmark reports it: both medians, their ratio (ours / baseline), the samples."""
    (name, samples), (base_name, base_samples) = ours, baseline
    median, base_median = statistics.median(samples), statistics.median(base_samples)
    return {
        "runs": len(samples),
        f"{name}_median_{unit}": round(median, digits),
        f"{base_name}_median_{unit}": round(base_median, digits),
        "ratio": round(median / base_median, 3),
        **extra,
        "samples": {name: [round(s, digits) for s in samples], base_name: [round(s, digits) for s in base_samples]},
    }


def pss_kib(pid: int) -> int:
    """A process's proportional set size (a page shared by k processes counts 1/k); 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:")), 0)
