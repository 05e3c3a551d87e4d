"""A real containerd daemon (Debian's 1.6) for tests: private config, root, state and sockets under a
temporary directory, inside a network namespace made for it, driven with `ctr`.

Two things 1.6 does not let a config change, and how the harness lives with them:
- the runc shim's options (BinaryName, Root) in config.toml are read only by the CRI plugin, which is
  disabled here; `ctr run --runc-binary/--runc-root` hands the same options to the shim per container;
- shims put their sockets under /run/containerd/s (a path compiled in); the harness removes that
  directory again if it made it and it is empty.

The daemon is started with `nsenter --net`, not `ip netns exec`: the latter also remounts /sys for the
namespace, which hides the cgroup hierarchies under /sys/fs/cgroup from containerd and the runtime.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.runtime_bundle import CGROUP_PARENT, Runtime

NAMESPACE = "micropod-test"
SHIM_SOCKETS = Path("/run/containerd")
START_TIMEOUT = 30.0


def config_toml(tmp: Path) -> str:
    return f"""\
version = 2
root = "{tmp}/root"
state = "{tmp}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{tmp}/containerd.sock"

[ttrpc]
  address = "{tmp}/containerd.sock.ttrpc"

[debug]
  level = "debug"

[plugins."io.containerd.internal.v1.opt"]
  path = "{tmp}/opt"
"""


def runtime_binary(runtime: Runtime, tmp: Path) -> Path:
    """One executable for the shim's BinaryName: a wrapper that notes each command it is given (so a test
    can tell the runtime under test really ran) and then execs the runtime's argv."""
    wrapper = tmp / "bin" / f"{runtime.name}-runtime"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    argv = " ".join(shlex.quote(arg) for arg in runtime.binary)
    calls = shlex.quote(str(tmp / "runtime-calls.log"))
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {argv} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@dataclass
class Containerd:
    tmp: Path
    netns: str
    process: subprocess.Popen[bytes]
    binary: Path
    runtime_root: Path

    @property
    def socket(self) -> Path:
        return self.tmp / "containerd.sock"

    @property
    def log(self) -> Path:
        return self.tmp / "containerd.log"

    def ctr(self, *args: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
        argv = ["ctr", "--address", str(self.socket), "--namespace", NAMESPACE, *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} exited {done.returncode}: {done.stderr}")
        return done

    def run_options(self, cid: str) -> list[str]:
        """`ctr run` options: the runtime under test as the shim's BinaryName, its state root, the
        container's cgroup inside the test's subtree, and FIFOs under the private directory."""
        return ["--runc-binary", str(self.binary), "--runc-root", str(self.runtime_root),
                "--cgroup", f"{CGROUP_PARENT}/ctrd-{cid}", "--fifo-dir", str(self.tmp / "fifo")]

    def tasks(self) -> dict[str, str]:
        lines = self.ctr("task", "ls", check=True).stdout.splitlines()[1:]
        return {fields[0]: fields[2] for fields in (line.split() for line in lines) if len(fields) >= 3}

    def wait_task_status(self, cid: str, status: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.tasks().get(cid) != status:
            assert time.monotonic() < deadline, f"task {cid} is {self.tasks().get(cid)}, not {status}"
            time.sleep(0.05)

    def runtime_calls(self) -> list[str]:
        path = self.tmp / "runtime-calls.log"
        return path.read_text().splitlines() if path.exists() else []

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"

    def remove_everything(self) -> None:
        """Kill and delete every task and container the test left, so that no shim outlives the test."""
        for cid in self.tasks():
            self.ctr("task", "kill", "-s", "SIGKILL", cid)
            with contextlib.suppress(AssertionError):
                self.wait_task_status(cid, "STOPPED", timeout=10)
            self.ctr("task", "delete", "--force", cid)
        for cid in self.ctr("container", "ls", "-q").stdout.split():
            self.ctr("container", "delete", cid)


def _wait_ready(daemon: Containerd) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if daemon.process.poll() is not None:
            raise AssertionError(f"containerd exited {daemon.process.returncode}:\n{daemon.log_tail()}")
        if daemon.socket.is_socket() and daemon.ctr("version", timeout=10).returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"containerd not ready after {START_TIMEOUT}s:\n{daemon.log_tail()}")
        time.sleep(0.05)


def _our_shims(tmp: Path) -> list[int]:
    """Shims started for this daemon: their command line names its socket."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if str(tmp / "containerd.sock").encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
    return pids


def _mounts_under(tmp: Path) -> list[str]:
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return sorted((m for m in mounts if m.startswith(f"{tmp}/")), key=len, reverse=True)


def _unmount_under(tmp: Path) -> list[str]:
    """Unmount what containerd left mounted (container rootfs overlays); returns what is still mounted."""
    for mountpoint in _mounts_under(tmp):
        subprocess.run(["umount", "-l", mountpoint], check=False, capture_output=True)
    return _mounts_under(tmp)


def _stop(daemon: Containerd) -> None:
    with contextlib.suppress(Exception):
        daemon.remove_everything()
    daemon.process.send_signal(signal.SIGTERM)
    try:
        daemon.process.wait(30)
    except subprocess.TimeoutExpired:
        daemon.process.kill()
        daemon.process.wait(10)
    for pid in _our_shims(daemon.tmp):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def containerd(runtime: Runtime) -> Iterator[Containerd]:
    """A running daemon whose `ctr run` containers use the given runtime; everything is gone afterwards."""
    # Short: the sockets' paths must fit in sun_path.
    tmp = Path(tempfile.mkdtemp(prefix="mp-ctrd-", dir="/tmp"))
    netns = f"micropod-ctrd-{secrets.token_hex(4)}"
    made_shim_dir = not SHIM_SOCKETS.exists()
    (tmp / "config.toml").write_text(config_toml(tmp))
    subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True)
    daemon: Containerd | None = None
    try:
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"], check=True)
        with (tmp / "containerd.log").open("wb") as log:
            process = subprocess.Popen(["nsenter", f"--net=/run/netns/{netns}", "containerd", "--config",
                                        str(tmp / "config.toml")], stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT)
        daemon = Containerd(tmp, netns, process, runtime_binary(runtime, tmp), runtime.root)
        _wait_ready(daemon)
        try:
            yield daemon
        except BaseException:
            print(f"containerd log (tail):\n{daemon.log_tail()}", file=sys.stderr)
            raise
    finally:
        if daemon is not None:
            _stop(daemon)
        subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)
        # Never remove a tree that still has something mounted inside it.
        if not _unmount_under(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if made_shim_dir:
            for leftover in (SHIM_SOCKETS / "s", SHIM_SOCKETS / "fifo", SHIM_SOCKETS):
                with contextlib.suppress(OSError):
                    leftover.rmdir()
