"""Boot from a snapshot: a QEMU VM saved once its agent is up, restored for every run.

A cold boot under TCG spends about two seconds on the kernel and on starting CPython in the guest,
the same work for every VM. So the first VM of a given shape (kernel, system image, vCPUs, memory,
upper-layer size, QEMU build, accelerator) is booted as a template with placeholder disks, paused
once the agent greets, and saved with QEMU's migration stream, its RAM apart (guestram.py). Each run
restores that stream with ``-incoming`` behind its own disks, on a shared copy-on-write mapping of
that RAM, and sends the agent ``restore``: fresh host entropy to reseed the guest's CRNG, and the
time. The agent drops its cached blocks of each disk before mounting it, since the template's
partition scan read other files behind the same devices.

The template's rootfs placeholder is large and sparse: the guest keeps the capacity it saw at boot,
and a squashfs image only reads within its own size, so every image fits behind it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from micropod import syscalls, wire
from micropod.errors import BootError, MicropodError, VmmError
from micropod.fsutil import flock, private_dir
from micropod.liveness import start_time
from micropod.paths import CacheRoot, switched_on
from micropod.unixsock import SocketDir
from micropod.vmm import guestram
from micropod.vmm.base import Drive, NetInterface, VmSpec
from micropod.vmm.child import wait_until
from micropod.vmm.qmp import QmpClient

if TYPE_CHECKING:
    from micropod.vmm.qemu import QemuVmm

    QemuFactory = Callable[..., QemuVmm]

log = logging.getLogger("micropod")

# 3: the guest's RAM, then a stream without it (guestram.py), in one file; 2: streams written by QEMU into our
# fd (1 went through `exec:cat`)
FORMAT_VERSION = "3"
# What a template's rootfs disk claims to hold; images up to this size can boot from the snapshot.
ROOTFS_PLACEHOLDER_SIZE = 1 << 40
TEMPLATE_TIMEOUT = 120.0
SAVE_TIMEOUT = 60.0
TEMPLATE_MAC = "02:00:00:00:00:01"
# Machine shapes whose snapshots are kept; past it, the least recently used goes when another is saved.
DEFAULT_KEPT = 8


def enabled() -> bool:
    return switched_on("MICROPOD_SNAPSHOTS")


def _identity(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def snapshot_key(spec: VmSpec, argv_shape: list[str], binary: Path, sizes: Mapping[str, int] | None = None,
                 extra: tuple[str, ...] = ()) -> str:
    """Everything the saved machine state depends on; disk files and log paths are not part of it. ``sizes``:
    writable drives not made yet; ``extra``: what a root-ready snapshot depends on too (rootsnap.py)."""
    h = hashlib.sha256()
    parts = [FORMAT_VERSION, str(wire.VERSION), _identity(binary), _identity(spec.kernel), spec.cmdline,
             str(spec.vcpus), str(spec.memory_mib), *argv_shape, *extra]
    for drive in spec.drives:
        known = (sizes or {}).get(drive.drive_id)
        size = 0 if drive.read_only else known if known is not None else drive.path.stat().st_size
        parts.append(f"{drive.drive_id}:{drive.read_only}:{drive.is_root}:{size}")
        if drive.is_root:
            parts.append(_identity(drive.path))
    for part in parts:
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def snapshot_dir(cache: CacheRoot) -> Path:
    explicit = os.environ.get("MICROPOD_SNAPSHOT_DIR")
    return Path(explicit) if explicit else cache.path / "snapshots"


def snapshot_path(cache: CacheRoot, key: str) -> Path:
    return snapshot_dir(cache) / f"{key}.qemu"


def machine_shape(spec: VmSpec) -> VmSpec:
    """``spec`` without what differs between VMs of one shape (disk files, TAPs, MACs, paths)."""
    return replace(spec, drives=tuple(replace(d, path=Path(d.drive_id)) for d in spec.drives),
                   shares=tuple(replace(s, path=Path(s.tag)) for s in spec.shares),
                   nets=tuple(template_nic(n, "tap") for n in spec.nets),
                   run_dir=Path("."), console_log=Path("console.log"))


def template_nic(nic: NetInterface, tap: str) -> NetInterface:
    """A NIC like ``nic`` on another TAP; the guest's MAC is set by the agent after a restore."""
    return NetInterface(nic.iface_id, tap, TEMPLATE_MAC)


TEMPLATE_TAP = re.compile(r"mptpl(\d+)n\d+")


def template_taps(spec: VmSpec) -> list[str]:
    """Throwaway TAPs on no bridge: the template's NICs must have a TAP backend like the VMs' own,
    so that the offloads negotiated at boot are still there when a VM resumes."""
    return [f"mptpl{os.getpid()}n{i}" for i in range(len(spec.nets))]


def stale_template_taps() -> list[str]:
    """Template TAPs whose builder died before it could delete them (the name carries its pid)."""
    stale = []
    for _, name in socket.if_nameindex():
        match = TEMPLATE_TAP.fullmatch(name)
        if match and start_time(int(match.group(1))) is None:  # no such process any more
            stale.append(name)
    return stale


def template_spec(spec: VmSpec, workdir: Path, taps: list[str] | None = None,
                  disks: Mapping[str, Path] | None = None) -> VmSpec:
    """The same machine with placeholder disks for everything but the shared system image and ``disks``."""
    drives = []
    for drive in spec.drives:
        if drive.is_root:
            drives.append(drive)
            continue
        if disks and drive.drive_id in disks:
            drives.append(replace(drive, path=disks[drive.drive_id]))
            continue
        placeholder = workdir / f"{drive.drive_id}.placeholder"
        size = ROOTFS_PLACEHOLDER_SIZE if drive.read_only else drive.path.stat().st_size
        with placeholder.open("wb") as f:
            f.truncate(size)
        drives.append(Drive(drive.drive_id, placeholder, drive.read_only, drive.is_root))
    nets = tuple(template_nic(nic, tap) for nic, tap in zip(spec.nets, taps or [], strict=True))
    shares = []
    for share in spec.shares:  # an empty directory: the template never mounts it
        placeholder = private_dir(workdir / f"{share.tag}.placeholder")
        shares.append(replace(share, path=placeholder))
    return replace(spec, drives=tuple(drives), nets=nets, shares=tuple(shares), run_dir=workdir,
                   console_log=workdir / "console.log")


class TemplateSetup(Protocol):
    """What a root-ready snapshot's template does beyond a boot snapshot's (rootsnap.py)."""

    def disks(self, workdir: Path) -> dict[str, Path]:
        """Real disks for some drives, made in the template's ``workdir``; the others get placeholders."""
        ...

    def prepare(self, channel: socket.socket) -> None:
        """Once the agent greeted, before the VM is paused and saved."""
        ...

    def commit(self, target: Path) -> None:
        """The template ended, its snapshot saved at ``target`` next: keep what goes with it."""
        ...


def save_template(vmm_factory: QemuFactory, spec: VmSpec, target: Path, setup: TemplateSetup | None = None) -> None:
    """Boot the template, wait for the agent's hello, pause, and save the migration stream."""
    workdir = private_dir(target.parent / f".template-{os.getpid()}")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    taps = template_taps(spec)
    _delete_taps(stale_template_taps())
    try:
        for tap in taps:
            syscalls.create_persistent_tap(tap)
    except OSError as exc:
        _delete_taps(taps)
        raise BootError(f"cannot create the snapshot template's TAP: {exc.strerror}") from exc
    ram = guestram.template_ram(spec.memory_mib)
    vmm: QemuVmm | None = None
    try:
        disks = setup.disks(workdir) if setup else None
        vmm = vmm_factory(template_spec(spec, workdir, taps, disks), snapshot=None, ram=ram)
        vmm.start()
        channel = vmm.connect_agent(TEMPLATE_TIMEOUT)
        channel.settimeout(TEMPLATE_TIMEOUT)
        try:
            kind, _, payload = wire.recv_frame(channel)
        except (OSError, wire.FrameError) as exc:
            raise BootError(f"the snapshot template did not come up: {exc}") from exc
        if kind != wire.CONTROL or wire.decode_control(payload)["op"] != wire.GuestOp.HELLO:
            raise BootError("the snapshot template's agent did not greet")
        if setup is not None:
            setup.prepare(channel)
        sockets = SocketDir(workdir)
        qmp = QmpClient(sockets.address("qmp.sock"))
        try:
            qmp.execute("stop")
            # The file: the guest's RAM (final once the VM is stopped), then the stream QEMU writes straight
            # into our descriptor, from where the RAM ends. With `exec:cat > file`, QEMU ends the cat when it
            # closes the channel at completion (SIGTERM after a short wait), which can cut a cat still writing
            # short: a truncated snapshot that the next restore rejects.
            out = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                guestram.write_image(ram, out)
                qmp.execute("getfd", pass_fd=out, fdname="snapshot")
            finally:
                os.close(out)
            qmp.execute("migrate-set-capabilities", capabilities=guestram.IGNORE_SHARED)
            qmp.execute("migrate", uri="fd:snapshot")

            def finished() -> str | None:
                status = str(qmp.execute("query-migrate").get("status"))
                return status if status in ("completed", "failed", "cancelled") else None

            status = wait_until(finished, proc=vmm.process, timeout=SAVE_TIMEOUT, what="the snapshot to be saved",
                                logs=vmm.logs(console=False))
            if status != "completed":
                raise VmmError(f"saving the snapshot failed ({status})")
            qmp.execute("quit")
        finally:
            qmp.close()
            sockets.close()
        channel.close()
        vmm.wait(10)
        with open(tmp, "rb") as saved_file:
            os.fsync(saved_file.fileno())
        if setup is not None:
            setup.commit(target)
        os.replace(tmp, target)
    finally:
        if vmm is not None:
            vmm.kill()
        os.close(ram.fd)
        tmp.unlink(missing_ok=True)
        for leftover in workdir.iterdir():
            if leftover.is_dir() and not leftover.is_symlink():
                leftover.rmdir()  # a share's placeholder, empty: the template never mounts it
            else:
                leftover.unlink()
        workdir.rmdir()
        _delete_taps(taps)


def _delete_taps(taps: list[str]) -> None:
    from micropod.net.links import delete_tap

    for tap in taps:
        delete_tap(tap)


def ensure_snapshot(vmm_factory: QemuFactory, spec: VmSpec, key: str, cache: CacheRoot | None = None,
                    setup: TemplateSetup | None = None) -> Path | None:
    """The snapshot for this machine shape, building it under a lock if missing; None if that fails."""
    cache = cache or CacheRoot.from_env()
    path = snapshot_path(cache, key)
    # Private, and closed if an older version left it open: a snapshot holds its clones' KASLR offsets and
    # canaries (README, Security model).
    private_dir(path.parent)
    if complete(path):
        with contextlib.suppress(OSError):
            # its last use, for the bound on how many are kept: the lock's time, since the snapshot's own times
            # are part of its identity (guestram.py)
            os.utime(guestram.lock_of(path))
        return path
    started = time.monotonic()
    try:
        with flock(guestram.lock_of(path)):
            if not complete(path):
                save_template(vmm_factory, spec, path, setup)
                log.info("saved boot snapshot %s in %.1fs", path.name[:12], time.monotonic() - started)
            with contextlib.suppress(OSError):
                os.utime(guestram.lock_of(path))  # used now: its lock's time was the build's start
    except MicropodError as exc:
        log.warning("booting without a snapshot: %s", exc)
        return None
    drop_least_used(cache, keep=path)
    return path


def drop_least_used(cache: CacheRoot, keep: Path | None = None) -> list[Path]:
    """Keep the ``kept()`` snapshots used last (and ``keep``, the one a run is about to use); the others go."""
    found = saved(cache)
    ordered = [keep, *(p for p in found if p != keep)] if keep in found else found  # keep: the one used last
    dropped = ordered[kept():]
    for stale in dropped:
        log.info("dropping the least recently used boot snapshot %s", stale.name[:12])
        invalidate(stale)
    return dropped


def kept() -> int:
    try:
        return max(1, int(os.environ.get("MICROPOD_SNAPSHOTS_KEPT", DEFAULT_KEPT)))
    except ValueError:
        return DEFAULT_KEPT


def saved(cache: CacheRoot) -> list[Path]:
    """The snapshots (of any format version), the most recently used first."""
    directory = snapshot_dir(cache)
    found = []
    for path in directory.glob("*.qemu") if directory.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):  # dropped meanwhile by another run
            found.append((_last_use(path), path))
    return [path for _, path in sorted(found, reverse=True)]


def _last_use(path: Path) -> int:
    try:
        return guestram.lock_of(path).stat().st_mtime_ns
    except FileNotFoundError:
        return path.stat().st_mtime_ns


def in_use(path: Path) -> bool:
    """Whether a holder keeps this snapshot's guest RAM for the VMs restored from it."""
    return guestram.holder_alive(path)


def complete(path: Path) -> bool:
    return path.exists()


def companions(path: Path) -> list[Path]:
    """What goes with a snapshot: a root-ready one's pristine writable layer (rootsnap.py)."""
    return [path.with_suffix(".upper")]


def invalidate(path: Path | None) -> None:
    """Drop a snapshot and its RAM's holder, under its lock; VMs running from it keep their mappings."""
    if path is not None and path.parent.is_dir():
        with flock(guestram.lock_of(path)):
            for gone in (path, *companions(path)):
                with contextlib.suppress(FileNotFoundError):
                    gone.unlink()
            guestram.release(path)
