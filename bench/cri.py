"""Start-up over the CRI (`micropod cri serve`, driven over its socket with tests/cri_client.py's stubs, as
kubelet would), in one run with one state root:

- one pod: RunPodSandbox + CreateContainer + StartContainer of `hello sh -c 'echo ready; exec sleep 3600'`
  until StartContainer has returned and ContainerStatus reads CONTAINER_RUNNING, and until the first line is in
  the container's CRI log, against `micropod run -d` of the same image and command until it has returned, and
  until the line is in its container.log; interleaved, medians;
- N pods (MICROPOD_BENCH_CRI_PODS, default 10) started at once from N client threads: the wall time to all
  running and each pod's own time (p50, p95 by nearest rank), against the same N started one after another
  through the same server, all left running until the N are up in both cases.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.timing import DemoRoot, comparison, demo_root, time_command

if TYPE_CHECKING:
    from tests.cri_client import rpc

RUNS = int(os.environ.get("BENCH_RUNS", "7"))
PODS = int(os.environ.get("MICROPOD_BENCH_CRI_PODS", "10"))
COMMAND = ["sh", "-c", "echo ready; exec sleep 3600"]
BOOT = 300.0


def run() -> dict[str, Any]:
    from tests.cri_client import CriServer

    with demo_root("cri") as demo:
        time_command([*demo.cli, "run", "--rm", "hello", "true"], demo.env)  # the rootfs and the boot snapshot
        server = CriServer(demo.tmp / "root", demo.tmp / "cri.sock", demo.tmp / "cri.log", env=demo.env).start()
        kubelet = Kubelet(server.runtime, demo.tmp / "logs")
        try:
            kubelet.remove(kubelet.start("warm-up")[0])  # the server's first pod, its imports and lazy set-up
            single = _single(kubelet, demo)
            many = _many(kubelet)
        finally:
            kubelet.remove_all()
            server.stop()
            _sweep(demo)
    return {"single_pod": single, "concurrent_pods": many}


class Kubelet:
    """Sandboxes of one `hello` container each, started as kubelet does, and every one of them stopped and
    removed over the CRI again."""

    def __init__(self, runtime: rpc.RuntimeServiceStub, logs: Path) -> None:
        self.runtime, self.logs = runtime, logs
        self.sandboxes: dict[str, str] = {}  # sandbox id: its container's

    def start(self, name: str) -> tuple[str, float, float, float]:
        """The sandbox's id, seconds until the container runs, until its first line is in its CRI log, and
        those of the RunPodSandbox call alone."""
        from tests.cri_client import pb

        logs = self.logs / name
        logs.mkdir(parents=True)
        config = pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="bench"),
                                     hostname=name, log_directory=str(logs))
        container = pb.ContainerConfig(metadata=pb.ContainerMetadata(name="app"), image=pb.ImageSpec(image="hello"),
                                       command=COMMAND, log_path="app.log")
        began = time.perf_counter()
        sid = self.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=BOOT).pod_sandbox_id
        sandbox = time.perf_counter() - began
        self.sandboxes[sid] = ""
        cid = self.runtime.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, sandbox_config=config,
                                                                     config=container), timeout=BOOT).container_id
        self.sandboxes[sid] = cid
        self.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=BOOT)
        state = self.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status.state
        running = time.perf_counter() - began
        if state != pb.CONTAINER_RUNNING:
            raise RuntimeError(f"container {cid} is {pb.ContainerState.Name(state)} after StartContainer")
        _wait_for_line(logs / "app.log")
        return sid, running, time.perf_counter() - began, sandbox

    def remove(self, sid: str) -> None:
        """StopContainer with no grace (its `sleep` ignores SIGTERM), StopPodSandbox, RemovePodSandbox."""
        from tests.cri_client import pb

        cid = self.sandboxes.pop(sid, "")
        calls: list[tuple[Any, Any]] = [(self.runtime.StopPodSandbox, pb.StopPodSandboxRequest(pod_sandbox_id=sid)),
                                        (self.runtime.RemovePodSandbox, pb.RemovePodSandboxRequest(pod_sandbox_id=sid))]
        if cid:
            calls.insert(0, (self.runtime.StopContainer, pb.StopContainerRequest(container_id=cid, timeout=0)))
        for method, request in calls:
            method(request, timeout=BOOT)

    def remove_all(self) -> None:
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(self.remove, list(self.sandboxes)))


def _single(kubelet: Kubelet, demo: DemoRoot) -> dict[str, Any]:
    cri_running: list[float] = []
    cri_logged: list[float] = []
    run_running: list[float] = []
    run_logged: list[float] = []
    sandbox_calls: list[float] = []
    for index in range(RUNS):
        sid, running, logged, sandbox = kubelet.start(f"one{index}")
        kubelet.remove(sid)
        cri_running.append(running)
        cri_logged.append(logged)
        sandbox_calls.append(sandbox)
        running, logged = _run_d(demo, f"run{index}")
        run_running.append(running)
        run_logged.append(logged)
    return {"until_running": comparison(("cri", cri_running), ("run_d", run_running),
                                        cri_run_pod_sandbox_median_s=round(statistics.median(sandbox_calls), 3)),
            "until_first_log_line": comparison(("cri", cri_logged), ("run_d", run_logged))}


def _run_d(demo: DemoRoot, name: str) -> tuple[float, float]:
    """`micropod run -d`: seconds until it has returned (the container has started), and until its first line is
    in the container's log; then it is removed."""
    began = time.perf_counter()
    done = subprocess.run([*demo.cli, "run", "-d", "--name", name, "hello", *COMMAND], env=demo.env,
                          capture_output=True, text=True, timeout=BOOT)
    running = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"run -d failed ({done.returncode}): {done.stderr[-500:]}")
    try:
        _wait_for_line(demo.tmp / "root" / "vms" / done.stdout.strip() / "container.log")
        logged = time.perf_counter() - began
    finally:
        subprocess.run([*demo.cli, "rm", "-f", name], env=demo.env, capture_output=True, timeout=BOOT)
    return running, logged


def _many(kubelet: Kubelet) -> dict[str, Any]:
    def batch(names: list[str], workers: int) -> tuple[float, list[float]]:
        began = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            started = list(pool.map(kubelet.start, names))
        wall = time.perf_counter() - began
        kubelet.remove_all()
        return wall, [running for _, running, _, _ in started]

    wall, each = batch([f"many{i}" for i in range(PODS)], PODS)
    seq_wall, seq_each = batch([f"seq{i}" for i in range(PODS)], 1)
    return {
        "pods": PODS, "baseline": f"the same {PODS} pods started one after another through the same server",
        "concurrent_wall_s": round(wall, 3), "sequential_wall_s": round(seq_wall, 3),
        "ratio": round(wall / seq_wall, 3),
        "concurrent_per_pod_s": _spread(each), "sequential_per_pod_s": _spread(seq_each),
        "per_pod_p50_vs_sequential_p50": round(statistics.median(each) / statistics.median(seq_each), 3),
        "samples": {"concurrent": _rounded(each), "sequential": _rounded(seq_each)},
    }


def _spread(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50": round(statistics.median(ordered), 3),
            "p95": round(ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)], 3),
            "max": round(ordered[-1], 3)}


def _rounded(samples: Iterable[float]) -> list[float]:
    return [round(s, 3) for s in samples]


def _wait_for_line(log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not (log.exists() and b"ready" in log.read_bytes()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no first line in {log}")
        time.sleep(0.005)


def _sweep(demo: DemoRoot) -> None:
    """Whatever a failure left behind: every pod and VM of the root, forcibly."""
    for listing, remove in ((["pod", "ps", "-q", "--no-trunc"], ["pod", "rm", "-f"]), (["ps", "-aq"], ["rm", "-f"])):
        left = subprocess.run([*demo.cli, *listing], env=demo.env, capture_output=True, text=True).stdout.split()
        if left:
            subprocess.run([*demo.cli, *remove, *left], env=demo.env, capture_output=True, timeout=BOOT)
