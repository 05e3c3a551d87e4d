"""The Firecracker backend: one firecracker process (optionally under the jailer) per VM.

start() launches the process, waits for its API socket, sends the configuration built by
firecracker_config.build_config() in one place (apply_config), then InstanceStart. The guest serial console is the
process's stdout. The agent channel is Firecracker's hybrid vsock: connect to the vsock device's Unix
socket, say ``CONNECT <port>``, read ``OK <hostport>``, and the socket is the guest's port from then on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from micropod import proc
from micropod.errors import BootError, VmmError
from micropod.quotas import IoLimits
from micropod.unixsock import SocketDir
from micropod.vmm import acl
from micropod.vmm import firecracker_api as api
from micropod.vmm.base import AGENT_VSOCK_PORT, VmSpec
from micropod.vmm.binaries import find_firecracker, find_jailer
from micropod.vmm.capped import CONSOLE_LOG_MAX, METRICS_LOG_MAX, VMM_LOG_MAX, CappedLog, close_all
from micropod.vmm.child import log_tail
from micropod.vmm.firecracker_config import (
    API_SOCK,
    KERNEL_IN_JAIL,
    METRICS_FIFO,
    METRICS_FILE,
    UNLIMITED,
    VMM_LOG,
    VMM_LOG_FIFO,
    VSOCK_SOCK,
    VmmLayout,
    apply_config,
    build_config,
    disk_limiter,
    drive_file_in_jail,
    net_limiter,
)

API_SOCKET_TIMEOUT = 10.0
KILL_TIMEOUT = 10.0


@dataclass(frozen=True)
class JailerConfig:
    """How to run firecracker under the jailer (docs/jailer.md)."""

    binary: Path
    uid: int
    gid: int
    chroot_base: Path = Path("/srv/jailer")
    netns: Path | None = None
    cgroup_version: int | None = None


def _backoff(first: float = 0.005, limit: float = 0.2) -> Iterator[float]:
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, limit)


class FirecrackerVmm:
    """One Firecracker microVM; implements micropod.vmm.base.Vmm."""

    name = "firecracker"

    def __init__(self, spec: VmSpec, binary: Path, jailer: JailerConfig | None = None) -> None:
        self.spec = spec
        self.binary = binary
        self.jailer = jailer
        # Firecracker and the jailer accept ids up to 64 characters; the short id reads better in ps.
        self.instance_id = spec.vm_id[:12]
        self.layout = VmmLayout(root=self._jail_root() if jailer else spec.run_dir, jailed=jailer is not None)
        self.config = build_config(spec, self.layout)
        self.sockets = SocketDir(self.layout.root)
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: api.FirecrackerClient | None = None
        self._console: CappedLog | None = None
        self._outputs: list[CappedLog] = []  # Firecracker's own log and metrics
        self._granted: list[Path] = []  # read-only files this VM's uid was given read access to (acl.py)
        self._pins: dict[Path, int] = {}  # the VMM's sockets, by O_PATH descriptors (_pinned)

    # Paths.

    def _jail_dir(self) -> Path:
        """<chroot_base>/<exec_file_name>/<id>: what the jailer creates, and we remove afterwards."""
        assert self.jailer is not None
        return self.jailer.chroot_base / self.binary.name / self.instance_id

    def _jail_root(self) -> Path:
        return self._jail_dir() / "root"

    @property
    def api_socket(self) -> Path:
        return self.layout.host(API_SOCK)

    @property
    def vsock_socket(self) -> Path:
        return self.layout.host(VSOCK_SOCK)

    @property
    def vmm_log(self) -> Path:
        # In the VM's own private directory, never in the jail: the jailed process owns the jail's root and
        # could swap names there under anything the host opens by path.
        return self.spec.run_dir / VMM_LOG

    @property
    def warm(self) -> bool:
        return False  # Firecracker snapshots (snapshot/load) are not used yet: every VM boots cold

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def argv(self) -> list[str]:
        api_sock = self.layout.visible(API_SOCK)
        if self.jailer is None:
            return [str(self.binary), "--api-sock", api_sock, "--id", self.instance_id]
        jailer = self.jailer
        argv = [
            str(jailer.binary), "--id", self.instance_id, "--exec-file", str(self.binary),
            "--uid", str(jailer.uid), "--gid", str(jailer.gid), "--chroot-base-dir", str(jailer.chroot_base),
        ]
        if jailer.netns is not None:
            argv += ["--netns", str(jailer.netns)]
        if jailer.cgroup_version is not None:
            argv += ["--cgroup-version", str(jailer.cgroup_version)]
        # The jailer passes --id itself; what follows "--" goes to firecracker.
        return [*argv, "--", "--api-sock", api_sock]

    # Lifecycle.

    def start(self) -> None:
        if self._proc is not None:
            raise VmmError(f"VM {self.instance_id} was already started")
        if self.spec.shares:
            raise VmmError("Firecracker has no shared filesystem for bind mounts of host directories: "
                           "use a named volume (-v NAME:/path) instead")
        self._prepare_files()
        # Firecracker's stdout is the guest's serial console: a pipe into a capped log, as for QEMU.
        self._console = CappedLog(self.spec.console_log, CONSOLE_LOG_MAX)
        try:
            self._capped_outputs()
            self._proc = proc.spawn(self.argv(), stdout=self._console.write_fd, stderr=self._console.write_fd,
                                    cwd=self.layout.root)
        except BaseException:
            close_all(*self._outputs)
            raise
        finally:
            close_all(self._console)
        try:
            self._wait_for_api_socket(API_SOCKET_TIMEOUT)
            self._client = api.FirecrackerClient(Path(self._pinned(self.api_socket)))
            apply_config(self._client, self.config)
            close_all(*self._outputs)  # Firecracker holds both fifos open now: its exit will be their EOF
            self._client.instance_start()
        except BaseException:
            close_all(*self._outputs)
            self.kill()
            raise

    def _capped_outputs(self) -> None:
        """Firecracker appends to its logger and metrics files itself, for as long as it runs, and the guest
        drives what it logs: so it gets named pipes, copied into capped files by us, as the console is. Each
        is kept as soon as it exists, so that a failure between them still closes the first."""
        self._outputs = [CappedLog(self.vmm_log, VMM_LOG_MAX, fifo=self.layout.host(VMM_LOG_FIFO))]
        self._outputs.append(CappedLog(self.spec.run_dir / METRICS_FILE, METRICS_LOG_MAX,
                                       fifo=self.layout.host(METRICS_FIFO)))
        if self.jailer is not None:
            for fifo in (VMM_LOG_FIFO, METRICS_FIFO):
                self._chown_for_jail(self.layout.host(fifo))

    def connect_agent(self, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        last_problem = "no attempt made"
        for delay in _backoff(first=0.01, limit=0.25):
            self._check_alive("while connecting to the guest agent")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                return self._vsock_connect(AGENT_VSOCK_PORT, min(remaining, 2.0))
            except OSError as exc:
                last_problem = str(exc) or type(exc).__name__
            time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
        raise BootError(
            f"the guest agent did not answer on vsock port {AGENT_VSOCK_PORT} within {timeout:g}s "
            f"(last attempt: {last_problem}){self._tails()}"
        )

    def wait(self, timeout: float | None = None) -> int | None:
        if self._proc is None:
            raise VmmError(f"VM {self.instance_id} was never started")
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._cleanup()
        return code

    def stop(self) -> None:
        if not self._running():
            return
        try:
            self._api().send_ctrl_alt_del()
        except VmmError:
            # The VMM may have exited between the check and the request; that is what stop wanted.
            if self._running():
                raise

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            try:
                self._proc.wait(KILL_TIMEOUT)
            except subprocess.TimeoutExpired as exc:
                raise VmmError(f"firecracker (pid {self._proc.pid}) survived SIGKILL for {KILL_TIMEOUT:g}s") from exc
        self._cleanup()

    def pause(self) -> None:
        self._api().pause()

    def resume(self) -> None:
        self._api().resume()

    def patch_drive(self, drive_id: str, path: Path) -> None:
        """Swap a placeholder drive's backing file after boot (how pods get later containers' disks); the file is
        as writable as the drive the VM booted with."""
        drive = next((d for d in self.spec.drives if d.drive_id == drive_id), None)
        if drive is None:
            raise VmmError(f"the VM has no drive {drive_id!r}")
        if self.jailer is not None:
            self._place_in_jail(path, drive_file_in_jail(drive_id), writable=not drive.read_only)
        self._api().patch_drive(
            api.PartialDrive(drive_id=drive_id, path_on_host=self.layout.resource(path, drive_file_in_jail(drive_id)))
        )

    def patch_mmds(self, data: dict[str, Any]) -> None:
        """Renew what the guest reads from MMDS (its credential) while it runs."""
        self._api().patch_mmds(data)

    def apply_limits(self) -> None:
        """Firecracker took them with its configuration, before boot."""

    def change_limits(self, drives: Mapping[str, IoLimits], net_rate: int | None) -> None:
        for drive_id, limits in drives.items():
            limiter = disk_limiter(limits) or UNLIMITED
            self._api().patch_drive(api.PartialDrive(drive_id=drive_id, rate_limiter=limiter))
        if net_rate is not None:
            limiter = net_limiter(net_rate) or UNLIMITED
            for net in self.spec.nets:
                self._api().patch_network_interface(api.PartialNetworkInterface(
                    iface_id=net.iface_id, rx_rate_limiter=limiter, tx_rate_limiter=limiter))

    # Internals.

    def _api(self) -> api.FirecrackerClient:
        if self._client is None:
            raise VmmError(f"VM {self.instance_id} is not running")
        return self._client

    def _running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _prepare_files(self) -> None:
        self.spec.run_dir.mkdir(parents=True, exist_ok=True)
        self.layout.root.mkdir(parents=True, exist_ok=True)
        # Firecracker refuses to bind a socket path that exists; a previous run's sockets are stale.
        for stale in (self.api_socket, self.vsock_socket):
            stale.unlink(missing_ok=True)
        if self.jailer is not None:
            self._place_in_jail(self.spec.kernel, KERNEL_IN_JAIL, writable=False)
            for drive in self.spec.drives:
                self._place_in_jail(drive.path, drive_file_in_jail(drive.drive_id), writable=not drive.read_only)

    def _place_in_jail(self, source: Path, name: str, *, writable: bool) -> None:
        """Hard-link a file into the chroot, as docs/jailer.md asks (a copy would cost the image's size)."""
        target = self.layout.host(name)
        target.unlink(missing_ok=True)
        if writable:
            # The jailed firecracker runs as uid:gid and must be able to write its read-write disks. The owner
            # is changed through a descriptor of the host's own file: the jail's names belong to the VMM, which
            # may have planted a link there.
            self._chown_for_jail(source)
        elif self.jailer is not None and os.geteuid() == 0 and source not in self._granted:
            # A read-only file (an image's base, shared by its VMs) stays root's: this VM's uid gets an ACL entry
            # to read it, taken away when the VM ends.
            acl.grant_read(source, self.jailer.uid)
            self._granted.append(source)
        try:
            os.link(source, target)
        except OSError as exc:
            hint = None
            if exc.errno == errno.EXDEV and self.jailer is not None:
                hint = f"put the jailer's chroot base {self.jailer.chroot_base} on the filesystem of {source}"
            raise VmmError(f"cannot place {source} in the jail at {target}: {exc.strerror}", hint=hint) from exc

    def _chown_for_jail(self, path: Path) -> None:
        assert self.jailer is not None
        if os.geteuid() != 0:
            return
        # O_NONBLOCK: the logger's and metrics' named pipes are owned this way too, and must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.fchown(fd, self.jailer.uid, self.jailer.gid)
        finally:
            os.close(fd)

    def _wait_for_api_socket(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for delay in _backoff():
            self._check_alive("before its API socket was ready")
            if _accepts_connections(self.api_socket, self.sockets.address(API_SOCK)):
                return
            if time.monotonic() >= deadline:
                raise BootError(
                    f"firecracker's API socket {self.api_socket} was not ready within {timeout:g}s{self._tails()}"
                )
            time.sleep(max(0.0, min(delay, deadline - time.monotonic())))

    def _check_alive(self, when: str) -> None:
        if self._proc is None:
            raise VmmError(f"VM {self.instance_id} was never started")
        code = self._proc.poll()
        if code is not None:
            raise BootError(f"firecracker exited with code {code} {when}{self._tails()}")

    def settle_logs(self) -> None:
        if self._console is not None and self._proc is not None and self._proc.poll() is not None:
            for log in (self._console, *self._outputs):
                log.settle()

    def _tails(self) -> str:
        self.settle_logs()
        parts = []
        console = log_tail(self.spec.console_log)
        if console:
            parts.append(f"\n--- console ({self.spec.console_log}) ---\n{console}")
        log = log_tail(self.vmm_log)
        if log:
            parts.append(f"\n--- firecracker log ({self.vmm_log}) ---\n{log}")
        return "".join(parts)

    def _vsock_connect(self, port: int, timeout: float) -> socket.socket:
        """One attempt at Firecracker's host-initiated hybrid vsock handshake."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self._pinned(self.vsock_socket))
            sock.sendall(f"CONNECT {port}\n".encode())
            line = _read_line(sock, limit=64)
            if not line.startswith(b"OK "):
                # Firecracker closes the connection when nothing listens on the guest port yet.
                raise ConnectionResetError(
                    f"vsock CONNECT {port} refused ({line.decode(errors='replace').strip() or 'connection closed'})"
                )
            sock.settimeout(None)
            return sock
        except BaseException:
            sock.close()
            raise

    def _pinned(self, path: Path) -> str:
        """The address of a socket Firecracker made, held by a descriptor from the first look on: the directory
        is the VMM's to write (jailed, it is its chroot), and a name it replaced later, by a link to another
        socket of the host, must not be where the monitor connects. The first look checks that the name is a
        socket of the VMM's own uid."""
        fd = self._pins.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                raise ConnectionRefusedError(f"{path} is not there yet") from None
            info = os.fstat(fd)
            owner = self.jailer.uid if self.jailer is not None else os.geteuid()
            if not stat.S_ISSOCK(info.st_mode) or info.st_uid != owner:
                os.close(fd)
                raise VmmError(f"{path} is not the socket firecracker made (a link, or another owner's)")
            self._pins[path] = fd
        return f"/proc/self/fd/{fd}"

    def _cleanup(self) -> None:
        for fd in self._pins.values():
            os.close(fd)
        self._pins.clear()
        if self._client is not None:
            self._client.close()
            self._client = None
        self.sockets.close()
        if self.jailer is not None:
            # Only hard links and our own files live there; the originals are untouched.
            shutil.rmtree(self._jail_dir(), ignore_errors=True)
            for path in self._granted:
                with contextlib.suppress(VmmError):
                    acl.revoke(path, self.jailer.uid)
            self._granted.clear()


def _accepts_connections(path: Path, address: str) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(address)
        except OSError:
            return False
    return True


def _read_line(sock: socket.socket, limit: int) -> bytes:
    """Read up to and including b"\\n", one byte at a time so no guest data after the line is consumed."""
    line = bytearray()
    while len(line) < limit:
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
        if byte == b"\n":
            break
    return bytes(line)


__all__ = [
    "FirecrackerVmm",
    "JailerConfig",
    "find_firecracker",
    "find_jailer",
]
