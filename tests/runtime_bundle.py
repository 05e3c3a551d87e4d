"""OCI bundles with a busybox-static root, and OCI runtimes (runc, micropod-runtime) driven as subprocesses.

Every container a bundle makes lives in a cgroup under CGROUP_PARENT, a subtree named for this test
session; `remove_cgroup_subtree` removes what the runtimes leave of it (runc removes a container's own
cgroup on delete but never its parents). Relative cgroupsPath: runc puts it under its own cgroup in each
hierarchy, so containers stay inside whatever memory limit the test process runs under.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parent.parent
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "id", "ls", "sleep", "true", "false", "echo", "chown", "unshare", "grep", "mount", "ps",
           "hostname", "readlink", "mkdir", "tty", "awk", "sort")
CGROUP_PARENT = f"micropod-test-{secrets.token_hex(4)}"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASSWD = "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
GROUP = "root:x:0:\nwheel:x:10:\nalice:x:1000:\nnogroup:x:65534:\n"

_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
_RO_NOSUID = ["nosuid", "noexec", "nodev"]
# `runc spec` (runc 1.1.5) as it prints it, except that the process has no terminal: tests read its output.
DEFAULT_SPEC: dict[str, Any] = {
    "ociVersion": "1.0.2-dev",
    "process": {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        "args": ["sh"],
        "env": [PATH_ENV, "TERM=xterm"],
        "cwd": "/",
        "capabilities": {key: list(_CAPS) for key in ("bounding", "effective", "permitted", "ambient")},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
    },
    "root": {"path": "rootfs", "readonly": True},
    "hostname": "runc",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": [*_RO_NOSUID, "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": list(_RO_NOSUID)},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": [*_RO_NOSUID, "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": [*_RO_NOSUID, "relatime", "ro"]},
    ],
    "linux": {
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
        "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                        "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                        "/proc/scsi"],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    },
}


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of base with overrides applied: mappings merge key by key, anything else replaces,
    and None removes the key."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def make_rootfs(rootfs: Path) -> Path:
    for name in ("bin", "proc", "sys", "dev", "tmp", "etc"):
        (rootfs / name).mkdir(parents=True, exist_ok=True)
    # A copy, not a hard link: a container with a writable root must not be able to change the host's busybox.
    shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text(PASSWD)
    (rootfs / "etc" / "group").write_text(GROUP)
    return rootfs


def make_bundle(tmp: Path, args: list[str], **overrides: Any) -> Path:
    """A fresh bundle directory under tmp: a busybox rootfs and DEFAULT_SPEC running args, with overrides
    deep-merged into it (e.g. ``linux={"namespaces": [...]}``, ``hostname=None``). Its cgroup is
    ``CGROUP_PARENT/<bundle name>`` unless overridden."""
    bundle = tmp / f"bundle-{secrets.token_hex(4)}"
    make_rootfs(bundle / "rootfs")
    config = deep_merge(DEFAULT_SPEC, {"process": {"args": list(args)},
                                       "linux": {"cgroupsPath": f"{CGROUP_PARENT}/{bundle.name}"}})
    write_config(bundle, deep_merge(config, overrides))
    return bundle


def load_config(bundle: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((bundle / "config.json").read_text())
    return config


def write_config(bundle: Path, config: Mapping[str, Any]) -> None:
    (bundle / "config.json").write_text(json.dumps(config, indent=2))


def cgroup_path(bundle: Path) -> str:
    return str(load_config(bundle)["linux"]["cgroupsPath"])


def _cgroup_roots() -> list[Path]:
    """For each mounted hierarchy this process is in, the directory of this process's own cgroup."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            own[controller] = path
    roots = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype, super_options = fields[sep + 1], fields[sep + 3].split(",")
        if fstype == "cgroup2" and "" in own:
            path = own[""]
        elif fstype == "cgroup":
            path = next((own[o] for o in super_options if o in own), "")
            if not path:
                continue
        else:
            continue
        roots.append(Path(fields[4]) / path.lstrip("/"))
    return roots


def cgroup_dirs(relative: str) -> list[Path]:
    """The directories a relative cgroupsPath names that exist, in every hierarchy."""
    return [root / relative for root in _cgroup_roots() if (root / relative).is_dir()]


def remove_cgroup_subtree(parent: str = CGROUP_PARENT) -> None:
    """rmdir what is left under the session's subtree, deepest first; only ever inside that subtree."""
    assert parent.startswith("micropod-test-"), parent
    for top in cgroup_dirs(parent):
        for directory in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                                reverse=True):
            directory.rmdir()
        top.rmdir()


@dataclass
class Runtime:
    """An OCI runtime binary with its own state root."""

    name: str
    binary: list[str]
    root: Path

    def argv(self, *args: str) -> list[str]:
        return [*self.binary, "--root", str(self.root), *args]

    def run(self, *args: str, check: bool = False, timeout: float = 60,
            **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run one command; stdout and stderr are captured through files, not pipes, because a container
        that `create` starts inherits them and would hold a pipe open long after the command is done."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            code = subprocess.run(self.argv(*args), stdout=out, stderr=err, timeout=timeout, check=False,
                                  **kwargs).returncode
            out.seek(0)
            err.seek(0)
            done = subprocess.CompletedProcess(self.argv(*args), code, out.read().decode(errors="replace"),
                                               err.read().decode(errors="replace"))
        if check and done.returncode != 0:
            raise AssertionError(f"{self.name} {' '.join(args)} exited {done.returncode}: {done.stderr}")
        return done

    def popen(self, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), text=True, **kwargs)

    def state(self, cid: str) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.run("state", cid, check=True).stdout)
        return state

    def ids(self) -> list[str]:
        """The state directories under the root: one per container the runtime knows."""
        return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []

    def delete_all(self) -> None:
        for cid in self.ids():
            self.run("delete", "-f", cid, timeout=30)


def wait_exit(pid: int, timeout: float = 30) -> None:
    """Wait for a process that is not our child to exit (a pidfd turns readable when it does)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not select.select([fd], [], [], timeout)[0]:
            raise AssertionError(f"process {pid} still running after {timeout}s")
    finally:
        os.close(fd)


def wait_stopped(runtime: Runtime, cid: str, timeout: float = 30) -> dict[str, Any]:
    """Wait for the container's process to exit, then for the runtime to report it stopped."""
    deadline = time.monotonic() + timeout
    state = runtime.state(cid)
    if state.get("pid"):
        wait_exit(int(state["pid"]), timeout)
    while state["status"] != "stopped" and time.monotonic() < deadline:
        time.sleep(0.01)  # the runtime may take a moment to notice the exit it reports
        state = runtime.state(cid)
    assert state["status"] == "stopped", f"{runtime.name}: {cid} is still {state['status']}"
    return state


# Helpers for differential tests.
CAPABILITIES = [
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE",
]


T = TypeVar("T")


def both(runc: Runtime, runtime: Runtime, observe: Callable[[Runtime], T]) -> tuple[T, T]:
    """runc's observation first, then the runtime under test's (the same one when that is runc)."""
    expected = observe(runc)
    return expected, expected if runtime is runc else observe(runtime)


@contextlib.contextmanager
def removed(runtime: Runtime, cid: str) -> Iterator[None]:
    try:
        yield
    finally:
        runtime.run("delete", "-f", cid, timeout=30)


def cap_mask(names: list[str]) -> str:
    return f"{sum(1 << CAPABILITIES.index(n.removeprefix('CAP_')) for n in names):016x}"


def read_line(stream: Any, timeout: float = 30) -> str:
    ready = select.select([stream], [], [], timeout)[0]
    assert ready, "no output from the container"
    return str(stream.readline())


@contextlib.contextmanager
def started(rt: Runtime, bundle: Path, cid: str, **kwargs: Any) -> Iterator[subprocess.Popen[str]]:
    """create + start, with the container's stdout a pipe the caller reads (it outlives `create`);
    deleted (forced) afterwards."""
    with tempfile.TemporaryFile() as err:
        create = rt.popen("create", "--bundle", str(bundle), cid, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=err, **kwargs)
        try:
            if create.wait(60) != 0:
                err.seek(0)
                raise AssertionError(f"{rt.name} create exited {create.returncode}: {err.read().decode()}")
            rt.run("start", cid, check=True)
            yield create
        finally:
            rt.run("delete", "-f", cid, timeout=30)
            assert create.stdout is not None
            create.stdout.close()


def freezer_state(bundle: Path) -> str:
    states = [(d / "freezer.state").read_text().strip() for d in cgroup_dirs(cgroup_path(bundle))
              if (d / "freezer.state").exists()]
    return states[0] if states else "no freezer"


def receive_fd(listener: socket.socket, timeout: float = 30) -> int:
    """The receiving end of --console-socket: one connection, one message carrying the pty master."""
    listener.settimeout(timeout)
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(timeout)
        _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
    assert len(fds) == 1, "no file descriptor in the console socket message"
    return fds[0]


def read_until_hangup(fd: int, timeout: float = 30) -> bytes:
    out = b""
    while select.select([fd], [], [], timeout)[0]:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the last slave fd closed
            break
        if not chunk:
            break
        out += chunk
    return out


def micropod_runtime_argv() -> list[str] | None:
    """How to run micropod-runtime, or None while it does not exist yet."""
    if not (REPO / "micropod" / "runtime" / "__main__.py").exists():
        return None
    script = REPO / ".venv" / "bin" / "micropod-runtime"
    return [str(script)] if script.exists() else [sys.executable, "-m", "micropod.runtime"]


def runtime_named(name: str, tmp: Path) -> Runtime:
    if name == "runc":
        if shutil.which("runc") is None:
            pytest.skip("runc is not installed (scripts/setup-host.sh installs it)")
        return Runtime("runc", ["runc"], tmp / "runc-root")
    argv = micropod_runtime_argv()
    if argv is None:
        pytest.skip("micropod-runtime does not exist yet (no micropod/runtime/__main__.py)")
    return Runtime("micropod", argv, tmp / "micropod-root")


RUNTIMES = ("runc", "micropod")


# Fixtures are registered under short names but defined as *_fixture: a test module imports
# cgroup_subtree_fixture, runc_fixture and runtime_fixture (noqa: F401) and then takes `runc: Runtime` and
# `runtime: Runtime` as parameters without shadowing an import.
@pytest.fixture(scope="session", name="cgroup_subtree")
def cgroup_subtree_fixture() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("OCI runtime tests need root")
    try:
        yield CGROUP_PARENT
    finally:
        remove_cgroup_subtree()


@pytest.fixture(name="runc")
def runc_fixture(tmp_path: Path, cgroup_subtree: str) -> Iterator[Runtime]:
    """The reference runtime, with a root of its own."""
    reference = runtime_named("runc", tmp_path)
    try:
        yield reference
    finally:
        reference.delete_all()


@pytest.fixture(params=RUNTIMES, name="runtime")
def runtime_fixture(request: pytest.FixtureRequest, tmp_path: Path, runc: Runtime) -> Iterator[Runtime]:
    """The runtime under test; for "runc" it is the reference itself."""
    if request.param == "runc":
        yield runc
        return
    under_test = runtime_named(request.param, tmp_path)
    try:
        yield under_test
    finally:
        under_test.delete_all()
