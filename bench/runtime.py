"""OCI runtime latency: `create` + `start` + (the process, `true`, exits) + `delete` of one busybox bundle,
micropod-runtime against runc (and crun where it runs), interleaved in one run.

The wait for the exit is a pidfd on the container's process (from --pid-file), so it costs no runtime
command and is the same for every runtime.
"""

from __future__ import annotations

import os
import select
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.timing import comparison

if TYPE_CHECKING:
    from tests.runtime_bundle import Runtime

RUNS = int(os.environ.get("BENCH_RUNTIME_RUNS", "30"))
DIGITS = 4


def _step(runtime: Runtime, *args: str) -> None:
    # stdout/stderr go nowhere: the container inherits them, and a pipe would stay open until it exits.
    code = subprocess.run(runtime.argv(*args), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=60).returncode
    if code != 0:
        detail = runtime.run(*args, stdin=subprocess.DEVNULL).stderr.strip()
        raise RuntimeError(f"{runtime.name} {args[0]} exited {code}: {detail}")


def lifecycle(runtime: Runtime, bundle: Path, cid: str) -> float:
    """Seconds for create, start, the process's exit and delete."""
    pid_file = bundle.parent / f"{cid}.pid"
    start = time.perf_counter()
    _step(runtime, "create", "--bundle", str(bundle), "--pid-file", str(pid_file), cid)
    pidfd = os.pidfd_open(int(pid_file.read_text()))
    try:
        _step(runtime, "start", cid)
        if not select.select([pidfd], [], [], 30)[0]:
            raise RuntimeError(f"{runtime.name}: the container's `true` did not exit")
    finally:
        os.close(pidfd)
    _step(runtime, "delete", cid)
    elapsed = time.perf_counter() - start
    pid_file.unlink()
    return elapsed


def _usable(runtime: Runtime, bundle: Path) -> str | None:
    """None when the runtime runs the bundle, else its own first line of why not."""
    done = runtime.run("run", "--bundle", str(bundle), "probe", stdin=subprocess.DEVNULL)
    runtime.delete_all()
    if done.returncode == 0:
        return None
    lines = done.stderr.strip().splitlines()
    return f"exit {done.returncode}: {lines[0] if lines else '(no message)'}"


def run() -> dict[str, Any]:
    import shutil

    from tests.runtime_bundle import Runtime, make_bundle, micropod_runtime_argv, remove_cgroup_subtree

    with tempfile.TemporaryDirectory(prefix="micropod-bench-runtime-") as tmp_dir:
        tmp = Path(tmp_dir)
        bundle = make_bundle(tmp, ["true"])
        candidates = {"runc": ["runc"], "crun": ["crun"]}
        argv = micropod_runtime_argv()
        if argv is not None:
            candidates["micropod"] = argv
        absent: dict[str, str] = {}
        if argv is None:
            absent["micropod"] = "micropod/runtime/__main__.py does not exist yet"
        runtimes = []
        try:
            for name, binary in candidates.items():
                if shutil.which(binary[0]) is None:
                    absent[name] = f"{binary[0]} is not installed"
                    continue
                runtime = Runtime(name, binary, tmp / f"{name}-root")
                reason = _usable(runtime, bundle)
                if reason is None:
                    runtimes.append(runtime)
                else:
                    absent[name] = reason
            if not any(r.name == "runc" for r in runtimes):
                raise RuntimeError(f"runc, the baseline, cannot run: {absent.get('runc')}")
            samples: dict[str, list[float]] = {r.name: [] for r in runtimes}
            for i in range(RUNS):
                for runtime in runtimes:
                    samples[runtime.name].append(lifecycle(runtime, bundle, f"bench-{i}"))
        finally:
            for runtime in runtimes:
                runtime.delete_all()
            remove_cgroup_subtree()
    extra: dict[str, Any] = {"absent": absent} if absent else {}
    if "crun" in samples:
        extra["crun_median_s"] = round(statistics.median(samples["crun"]), DIGITS)
        extra["crun_ratio"] = round(statistics.median(samples["crun"]) / statistics.median(samples["runc"]), 3)
    if "micropod" not in samples:
        return {"runs": RUNS, "runc_median_s": round(statistics.median(samples["runc"]), DIGITS), **extra,
                "samples": {name: [round(s, DIGITS) for s in values] for name, values in samples.items()}}
    return comparison(("micropod", samples["micropod"]), ("runc", samples["runc"]), digits=DIGITS, **extra)
