"""The QEMU backend: the `microvm` machine with virtio-mmio devices, controlled over QMP.

The agent channel is a virtio-serial port, because this kind of host has no vhost-vsock. micropod
listens on the port's Unix socket before QEMU starts and QEMU connects to it as a client, so there is
no race between QEMU creating a socket and micropod polling for it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from micropod import proc
from micropod.errors import BootError, VmmError, VmmUnavailableError
from micropod.quotas import IoLimits
from micropod.unixsock import SocketDir
from micropod.vmm import guestram
from micropod.vmm.accel import choose_accel
from micropod.vmm.base import AGENT_SERIAL_NAME, VmSpec
from micropod.vmm.binaries import find_qemu
from micropod.vmm.capped import CONSOLE_LOG_MAX, VMM_LOG_MAX, CappedLog, close_all
from micropod.vmm.child import LogSource, died_error, wait_exit, wait_until
from micropod.vmm.guestram import GuestRam
from micropod.vmm.qemu_blocks import format_node, swap_backing_file
from micropod.vmm.qemu_confined import Handles, Jail, add_fd_argv, fd_set, open_handles
from micropod.vmm.qemu_scsi import ScsiDisks, controller_argv
from micropod.vmm.qmp import QmpClient

QEMU_BINARY = "qemu-system-x86_64"




AGENT_SOCK = "agent.sock"
QMP_SOCK = "qmp.sock"


@dataclass(frozen=True)
class QemuLayout:
    """Where this VM's QEMU sockets and logs live. QEMU runs in ``run_dir`` and is given bare socket
    names, which keeps them within sun_path's 107 bytes however deep the state root is."""

    run_dir: Path

    @classmethod
    def in_dir(cls, run_dir: Path) -> QemuLayout:
        return cls(run_dir)

    @property
    def vmm_log(self) -> Path:
        return self.run_dir / "vmm.log"


def machine_options(accel: str, ram: GuestRam | None = None) -> str:
    # No ACPI: the guest ends the VM by rebooting, which -no-reboot turns into QEMU exiting, and SMP
    # comes from the MP table. Under TCG the guest has no kvmclock and hangs without the PIT and PIC;
    # with KVM they only cost boot time. Turning the RTC off doubles TCG boot time (measured).
    return ("microvm,acpi=off,x-option-roms=off" + (",pit=off,pic=off" if accel == "kvm" else "")
            + (f",memory-backend={guestram.BACKEND_ID}" if ram else ""))


# QEMU's seccomp filter: no obsolete syscalls, no setuid/setgid or capability changes, no fork or exec,
# no scheduler or resource-limit changes. A QEMU bug exploited by a guest then cannot start a shell, become
# another user or raise its own limits.
QEMU_SANDBOX = ("-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")


def qemu_argv(spec: VmSpec, binary: Path, accel: str, layout: QemuLayout, handles: Handles | None = None,
              ram: GuestRam | None = None) -> list[str]:
    """The whole QEMU command line for a VmSpec, as data that tests can check; with ``handles`` (a confined QEMU,
    micropod/vmm/qemu_confined.py) every file and socket is a descriptor it is given, never a name. With ``ram``
    the guest's RAM is that file (a snapshot's template or clone, micropod/vmm/guestram.py)."""
    qmp = (["-chardev", f"socket,id=qmp,fd={handles.qmp},server=on,wait=off", "-mon", "chardev=qmp,mode=control"]
           if handles else ["-qmp", f"unix:{QMP_SOCK},server=on,wait=off"])
    agent = f"socket,id=agent,fd={handles.agent}" if handles else f"socket,id=agent,path={AGENT_SOCK}"
    argv = [
        str(binary),
        *(add_fd_argv(handles) if handles else ()),
        "-M", machine_options(accel, ram),
        "-accel", accel,
        "-cpu", "host" if accel == "kvm" else "max",
        "-smp", str(spec.vcpus),
        "-m", f"{spec.memory_mib}M",
        *(ram.argv(spec.memory_mib) if ram else ()),
        "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
        *(QEMU_SANDBOX if spec.confined else ()),
        "-kernel", str(spec.kernel),
        "-append", spec.cmdline,
        # The console is QEMU's stdout, a pipe into a capped log (capped.py); QEMU's own file would be unbounded.
        "-chardev", "stdio,id=console,signal=off",
        "-serial", "chardev:console",
        *qmp,
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-device,rng=rng0",
        "-device", "virtio-serial-device,max_ports=2",
        "-chardev", agent,
        "-device", f"virtserialport,chardev=agent,name={AGENT_SERIAL_NAME}",
    ]
    for drive in spec.drives:
        readonly = ",readonly=on" if drive.read_only else ""
        argv += [
            "-drive", f"id={drive.drive_id},node-name={format_node(drive.drive_id)},"
                      f"file={f'/dev/fdset/{fd_set(handles, drive.drive_id)}' if handles else drive.path},format=raw,"
                      # confined, a writable disk is two descriptors of one file (qemu_confined.open_disk), whose
                      # OFD locks would conflict with each other on a snapshot's restore: micropod's own flocks and
                      # the one VM per writable file hold instead
                      f"if=none,cache=unsafe,discard=unmap,aio=threads{readonly}"
                      f"{',file.locking=off' if handles else ''}",
            "-device", f"virtio-blk-device,drive={drive.drive_id}",
        ]
    if spec.hot_disks:
        argv += controller_argv()
    for net in spec.nets:
        argv += [
            "-netdev", f"tap,id={net.iface_id},fd={handles.taps[net.iface_id]}" if handles
            else f"tap,id={net.iface_id},ifname={net.tap},script=no,downscript=no",
            "-device", f"virtio-net-device,netdev={net.iface_id},mac={net.mac}",
        ]
    for share in spec.shares:
        # mapped-xattr: what the guest sets (owner, mode, setuid bits, device nodes, symlinks) is kept in
        # xattrs of plain files that QEMU creates 0600/0700 as itself, so no file a guest writes is ever a
        # setuid binary, a device or a symlink on the host. A comma in an option value is written twice.
        # confined, the share is bound into QEMU's jail (qemu_confined.Jail)
        readonly = ",readonly=on" if share.read_only else ""
        path = (Jail.share_path(share.tag) if handles else str(share.path)).replace(",", ",,")
        argv += [
            "-fsdev", f"local,id={share.tag},path={path},security_model=mapped-xattr{readonly}",
            "-device", f"virtio-9p-device,fsdev={share.tag},mount_tag={share.tag}",
        ]
    return argv


class QemuVmm:
    """A VM run by qemu-system-x86_64 -M microvm."""

    name = "qemu"

    def __init__(
        self, spec: VmSpec, binary: Path | None = None, accel: str | None = None, snapshot: Path | None = None,
        ram: GuestRam | None = None, snapshot_fd: int | None = None,
    ) -> None:
        """``snapshot``: restore it, on the shared copy of its guest RAM (from ``snapshot_fd``, its file opened
        already, which this VMM then owns: rootsnap.py opens it with the layer that must go with it); ``ram``:
        run on this RAM file (the snapshot template's, which the caller owns)."""
        found = binary or find_qemu()
        if found is None:
            raise VmmUnavailableError(
                f"{QEMU_BINARY} not found", hint="install qemu-system-x86; see 'micropod doctor'"
            )
        self.spec = spec
        self.binary = found
        self.accel = accel or choose_accel()
        self.layout = QemuLayout.in_dir(spec.run_dir)
        self.sockets = SocketDir(spec.run_dir)
        self.snapshot = snapshot
        self._snapshot_fd = snapshot_fd
        self.ram = ram
        self._proc: subprocess.Popen[bytes] | None = None
        self._listener: socket.socket | None = None
        self._agent: socket.socket | None = None  # a confined QEMU's agent channel, until connect_agent takes it
        self._swaps: dict[str, int] = {}  # drive id -> how many times patch_drive swapped its file
        self._console: CappedLog | None = None
        self._vmm_log: CappedLog | None = None

    @property
    def warm(self) -> bool:
        """Resumed from a snapshot: the agent greeted the template already and waits for ``restore``."""
        return self.snapshot is not None

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self._running()[0]

    @property
    def argv(self) -> list[str]:
        return qemu_argv(self.spec, self.binary, self.accel, self.layout)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def settle_logs(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            for log in (self._console, self._vmm_log):
                if log is not None:
                    log.settle()

    def logs(self, console: bool = True) -> tuple[LogSource, ...]:
        """What to quote when QEMU fails: its own output, then the guest's console."""
        vmm: LogSource = self._vmm_log or self.layout.vmm_log
        return (vmm, self._console or self.spec.console_log) if console else (vmm,)

    def start(self) -> None:
        (self.spec.run_dir / QMP_SOCK).unlink(missing_ok=True)
        clone_ram: GuestRam | None = None
        snapshot_fd = -1
        if self.snapshot is not None:
            # The snapshot is the guest's RAM, then the stream: QEMU reads the stream from where the RAM ends, and
            # runs on the RAM every clone shares (a descriptor that is ours to close once QEMU has it).
            try:
                snapshot_fd = (self._snapshot_fd if self._snapshot_fd is not None
                               else os.open(self.snapshot, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
            except OSError as exc:
                raise BootError(f"the boot snapshot cannot be opened: {exc.strerror}") from exc
            self._snapshot_fd = None
            try:
                ram_size = self.spec.memory_mib << 20
                clone_ram = guestram.clone_ram(self.snapshot, snapshot_fd, ram_size)
                os.lseek(snapshot_fd, ram_size, os.SEEK_SET)
            except BaseException:
                os.close(snapshot_fd)
                raise
        ram = clone_ram or self.ram
        uid = self.spec.vmm_uid
        handles, jail = None, None
        try:
            if uid is None:
                self._listener = self.sockets.listen(AGENT_SOCK, backlog=1)
                argv = qemu_argv(self.spec, self.binary, self.accel, self.layout, ram=ram)
            else:
                handles = open_handles(self.spec, self.sockets, QMP_SOCK)
                self._agent = handles.ours
                jail_dir = self.spec.run_dir / "jail"
                jail_dir.mkdir(mode=0o700, exist_ok=True)
                jail = Jail.for_vm(jail_dir, self.spec.kernel, uid, self.accel, proc=ram is not None,
                                   shares=self.spec.shares)
                argv = qemu_argv(replace(self.spec, kernel=Path(jail.KERNEL)), self.binary, self.accel,
                                 self.layout, handles, ram)
            fds = [*(handles.fds if handles else ()), *((ram.fd,) if ram else ())]
            if snapshot_fd >= 0:
                fds.append(snapshot_fd)
                argv += ["-incoming", "defer"]  # once x-ignore-shared is set (_resume_restored)
            self._console = CappedLog(self.spec.console_log, CONSOLE_LOG_MAX, deferred=True)
            self._vmm_log = CappedLog(self.layout.vmm_log, VMM_LOG_MAX, deferred=True)
            # A confined QEMU runs as its own uid from the start: the VM's directory is not its cwd to reach.
            self._proc = proc.spawn(argv, stdout=self._console.write_fd, stderr=self._vmm_log.write_fd,
                                    cwd=self.spec.run_dir if uid is None else Path("/"), pass_fds=fds,
                                    preexec=None if jail is None else jail.enter)
        except BaseException:
            if handles is not None:
                handles.close_all()
                self._agent = None
            raise
        finally:
            close_all(*(log for log in (self._console, self._vmm_log) if log is not None))
            if snapshot_fd >= 0:
                os.close(snapshot_fd)
            if clone_ram is not None:
                os.close(clone_ram.fd)
            if handles is not None:
                handles.close_passed()
        if self.snapshot is not None:
            self._resume_restored(snapshot_fd)

    def _resume_restored(self, stream_fd: int) -> None:
        """Load the snapshot from QEMU's copy of ``stream_fd``, then let the (saved while paused) guest run."""
        child = self.process
        qmp = wait_until(self._try_qmp, proc=child, timeout=30, what="QEMU's control socket",
                         logs=self.logs(console=False))
        try:
            qmp.execute("migrate-set-capabilities", capabilities=guestram.IGNORE_SHARED)
            qmp.execute("migrate-incoming", uri=f"fd:{stream_fd}")
            def loaded() -> str | None:
                reply = qmp.execute("query-status")
                if not isinstance(reply, dict) or "status" not in reply:
                    raise BootError(f"QMP query-status answered {reply!r} while restoring the snapshot")
                status = str(reply["status"])
                return None if status == "inmigrate" else status

            status = wait_until(loaded, proc=child, timeout=60, what="QEMU to load the snapshot",
                                logs=self.logs(console=False))
            if status != "paused":
                raise BootError(f"QEMU restored the snapshot into state {status!r}")
            qmp.execute("cont")
        except (OSError, VmmError) as exc:
            # Every failure here must be a BootError: the monitor then drops the snapshot and boots cold.
            raise BootError(f"resuming the snapshot failed: {exc}") from exc
        finally:
            qmp.close()

    def _try_qmp(self) -> QmpClient | None:
        try:
            return QmpClient(self.sockets.address(QMP_SOCK))
        except VmmError:
            return None

    def connect_agent(self, timeout: float) -> socket.socket:
        """Accept QEMU's connection to the agent port's socket (made as soon as QEMU starts); a confined QEMU has
        the other end of a socketpair already."""
        if self._agent is not None:
            self._running()
            conn, self._agent = self._agent, None
            return conn
        child, listener = self._running()
        if listener is None:
            raise VmmError("the agent channel was already taken")
        listener.setblocking(False)

        def accept() -> socket.socket | None:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return None
            return conn

        try:
            conn = wait_until(accept, proc=child, timeout=timeout, what="QEMU to open the agent channel",
                              logs=self.logs())
        finally:
            listener.close()
            self._listener = None
        conn.setblocking(True)
        return conn

    def wait(self, timeout: float | None = None) -> int | None:
        child, _ = self._running()
        return wait_exit(child, timeout)

    def stop(self) -> None:
        """Ask QEMU to quit; the guest has had its chance to shut down through the agent."""
        child, _ = self._running()
        if child.poll() is not None:
            return
        try:
            self._qmp("quit")
        except VmmError:
            self.kill()

    def kill(self) -> None:
        if self._proc and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()

    def patch_drive(self, drive_id: str, path: Path) -> None:
        """Swap a placeholder drive's backing file after boot (how pods get later containers' disks)."""
        drive = next((d for d in self.spec.drives if d.drive_id == drive_id), None)
        if drive is None:
            raise VmmError(f"the VM has no drive {drive_id!r}")
        generation = self._swaps.get(drive_id, -1) + 1
        client = QmpClient(self.sockets.address(QMP_SOCK))
        try:
            swap_backing_file(client, drive_id, path, drive.read_only, generation)
        finally:
            client.close()
        self._swaps[drive_id] = generation

    def apply_limits(self) -> None:
        drives = {d.drive_id: d.limits for d in self.spec.drives if d.limits}
        rate = max((n.rate for n in self.spec.nets), default=0)
        if drives or rate:
            self.change_limits(drives, rate or None)

    def change_limits(self, drives: Mapping[str, IoLimits], net_rate: int | None) -> None:
        """Disks through QEMU's throttling (block_set_io_throttle, as `-drive throttling.*` would set), the NIC
        through tc on its TAP."""
        if drives:
            qmp = wait_until(self._try_qmp, proc=self.process, timeout=30, what="QEMU's control socket",
                             logs=self.logs(console=False))
            try:
                for drive_id, limits in drives.items():
                    qmp.execute("block_set_io_throttle", device=drive_id, bps=0, bps_rd=limits.read_bps,
                                bps_wr=limits.write_bps, iops=0, iops_rd=limits.read_iops, iops_wr=limits.write_iops)
            finally:
                qmp.close()
        if net_rate is not None:
            from micropod.net.shaping import shape

            for net in self.spec.nets:
                shape(net.tap, net_rate)

    def hot_disks(self) -> ScsiDisks:
        """The pod VM's SCSI disks, added and removed while it runs."""
        return ScsiDisks(self.sockets.address(QMP_SOCK), self.spec.hot_disks)

    def pause(self) -> None:
        self._qmp("stop")

    def resume(self) -> None:
        self._qmp("cont")

    def check_alive(self) -> None:
        child, _ = self._running()
        if child.poll() is not None:
            raise died_error("QEMU", child, *self.logs())

    def _qmp(self, command: str) -> None:
        client = QmpClient(self.sockets.address(QMP_SOCK))
        try:
            client.execute(command)
        finally:
            client.close()

    def _running(self) -> tuple[subprocess.Popen[bytes], socket.socket | None]:
        if self._proc is None:
            raise VmmError("QEMU was not started")
        return self._proc, self._listener
