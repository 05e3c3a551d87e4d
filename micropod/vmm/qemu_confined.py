"""QEMU as a uid of its own: everything it needs is opened by the monitor and handed over as a descriptor.

QEMU's own ``-runas`` cannot be used: its seccomp sandbox (``elevateprivileges=deny``) forbids the setuid it
would make, and drops it at the end of start-up, after the files are open. So QEMU is started as the VM's uid
from the first instruction, and reaches nothing by name: its disks come as ``-add-fd`` sets (``/dev/fdset/N``),
its TAP as an open tun descriptor, its agent channel as one end of a socketpair and its QMP socket as a listener
bound by the monitor. The VM's directory (0700, root's) and the state root stay closed to it, as does every file
its uid cannot read (``blockdev-add`` of /etc/shadow fails). Disks hot-added later come over QMP ``add-fd``.

A host directory shared over virtio-9p cannot be a descriptor: QEMU's 9p server opens it by path. So it is bound
into the jail (``/shares/<tag>``, recursively, every mount in it made nosuid and nodev, and read-only for ``:ro``,
flags added to the host's, never cleared), and QEMU keeps one capability, CAP_DAC_OVERRIDE, to read and write the
files there whoever owns them (as the user who shared it could); it cannot chown (mapped-xattr keeps owners and
modes in xattrs) nor chmod a file it did not create, and a seccomp filter of ours (below QEMU's own) refuses it
any set-uid or set-gid mode: a QEMU its guest took over can plant no set-id binary of its uid there (mapped-xattr
keeps the guest's own set-id bits in xattrs, so QEMU never needs one). Every mount of the jail is a private copy,
but for a CRI sandbox's shared directory, a slave of the host's: the host paths the host binds there after boot
reach QEMU. Nothing mounted in the jail ever reaches the host.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from micropod import syscalls
from micropod.errors import VmmUnavailableError
from micropod.syscalls import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    MOUNT_ATTR_NODEV,
    MOUNT_ATTR_NOSUID,
    MOUNT_ATTR_RDONLY,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    MS_SLAVE,
    ambient_raise,
    capbset_drop,
    capset,
    mount,
    mount_setattr,
    seccomp_set_filter,
    set_keepcaps,
    set_no_new_privs,
    unshare,
)
from micropod.unixsock import SocketDir
from micropod.vmm.base import Share, VmSpec

CAP_DAC_OVERRIDE = 1

# What a confined QEMU with a share may not do: give a file or directory a set-uid or set-gid mode (the mode
# argument's index per call), nor use the calls whose modes a filter cannot see (openat2's is in a struct,
# io_uring's requests are not system calls at all). QEMU 7.2 makes none of them for mapped-xattr 9p.
_MODE_ARGUMENT = {"chmod": 1, "fchmod": 1, "creat": 1, "mkdir": 1, "mknod": 1, "fchmodat": 2, "fchmodat2": 2,
                  "mkdirat": 2, "mknodat": 2, "open": 2, "openat": 3}
SETID_GUARD = {
    "defaultAction": "SCMP_ACT_ALLOW",
    "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "syscalls": [
        *({"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM,
           "args": [{"index": index, "value": bit, "valueTwo": bit, "op": "SCMP_CMP_MASKED_EQ"}
                    for bit in (0o4000, 0o2000)]}
          for name, index in _MODE_ARGUMENT.items()),
        {"names": ["openat2", "io_uring_setup", "io_uring_enter", "io_uring_register"],
         "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS},
    ],
}


def setid_guard() -> bytes:
    """SETID_GUARD as a BPF program, compiled before the fork (libseccomp, micropod/runtime/seccomp.py)."""
    from micropod.runtime import seccomp

    unknown = seccomp.unknown_syscalls(SETID_GUARD)
    if unknown:  # libseccomp skips a name it does not know: the guard would silently let that call through
        raise VmmUnavailableError(f"this libseccomp does not know {', '.join(unknown)}: a VM with a host directory "
                                  "share cannot have its VMM confined here",
                                  hint="upgrade libseccomp, or use --security-opt vmm-confinement=off")
    flt = seccomp.parse(SETID_GUARD, "the VMM's set-id guard")
    assert flt is not None
    return seccomp.compile_filter(flt)


@dataclass
class Handles:
    """What a confined QEMU is given, by descriptor; the monitor closes its copies once QEMU has them."""

    # drive id -> its descriptors: a read-only one, and for a writable drive a read-write one too (QEMU opens a
    # writable disk read-only first, then again for writing, and takes from the fd set the one of each mode)
    drives: dict[str, list[int]] = field(default_factory=dict)
    taps: dict[str, int] = field(default_factory=dict)  # iface id -> fd
    agent: int = -1  # QEMU's end of the agent channel
    qmp: int = -1  # the QMP listener
    ours: socket.socket | None = None  # the monitor's end of the agent channel
    listener: socket.socket | None = None

    @property
    def fds(self) -> list[int]:
        return [*(fd for fds in self.drives.values() for fd in fds), *self.taps.values(), self.agent, self.qmp]

    def close_passed(self) -> None:
        """The descriptors QEMU now holds (ours to close; the agent's end and the QMP listener too)."""
        agent = [self.agent] if self.agent >= 0 else []
        for fd in [*(fd for fds in self.drives.values() for fd in fds), *self.taps.values(), *agent]:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.listener is not None:
            self.listener.close()
        self.agent, self.listener = -1, None
        self.drives.clear()
        self.taps.clear()

    def close_all(self) -> None:
        self.close_passed()
        if self.ours is not None:
            self.ours.close()


def open_handles(spec: VmSpec, sockets: SocketDir, qmp_name: str) -> Handles:
    """Open every disk and TAP of ``spec``, the agent channel and the QMP listener; on failure none stay open."""
    handles = Handles()
    try:
        for drive in spec.drives:
            handles.drives[drive.drive_id] = open_disk(drive.path, not drive.read_only)
        for net in spec.nets:
            handles.taps[net.iface_id] = syscalls.open_tap(net.tap)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        handles.ours, handles.agent = ours, theirs.detach()
        handles.listener = sockets.listen(qmp_name, backlog=4)
        handles.qmp = handles.listener.fileno()
    except BaseException:
        handles.close_all()
        raise
    return handles


def fd_set(handles: Handles, drive_id: str) -> int:
    """The ``-add-fd`` set that carries a drive's descriptor."""
    return list(handles.drives).index(drive_id) + 1


def add_fd_argv(handles: Handles) -> list[str]:
    out: list[str] = []
    for drive_id, fds in handles.drives.items():
        for fd in fds:
            out += ["-add-fd", f"fd={fd},set={fd_set(handles, drive_id)},opaque={drive_id}"]
    return out


def open_disk(path: Path, writable: bool) -> list[int]:
    """A disk's descriptors for an fd set: read-only, and read-write too if it is writable."""
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    fds = [os.open(path, os.O_RDONLY | flags)]
    if writable:
        try:
            fds.append(os.open(path, os.O_RDWR | flags))
        except BaseException:
            os.close(fds[0])
            raise
    return fds


@dataclass(frozen=True)
class Jail:
    """A confined QEMU's view of the filesystem: a mount namespace of its own whose root is an empty tmpfs with
    /usr (QEMU, its libraries and firmware) read-only, a few character devices, and the VM's kernel; everything
    else it uses is a descriptor. Set up in the child between fork and exec, as root, then the uid is dropped."""

    root: Path  # an empty directory of the VM's (the tmpfs goes over it, in the child's namespace only)
    kernel: Path
    uid: int
    devices: tuple[str, ...] = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
    groups: tuple[int, ...] = ()  # the kvm group, for /dev/kvm
    # QEMU opens its guest RAM (a sealed memfd it inherits, micropod/vmm/guestram.py) by /proc/self/fd/N: a /proc
    # of its own then, showing no other process and no system file (subset=pid, hidepid=invisible), read-only
    proc: bool = False
    shares: tuple[Share, ...] = ()  # host directories for virtio-9p, bound at share_path(tag)
    guard: bytes = b""  # with shares: setid_guard(), loaded last

    @classmethod
    def for_vm(cls, root: Path, kernel: Path, uid: int, accel: str, proc: bool = False,
               shares: tuple[Share, ...] = ()) -> Jail:
        """With /dev/kvm, and its group, when the VM runs on KVM; with /proc for shares too (QEMU's 9p server sets
        xattrs through /proc/self/fd/N/NAME: there is no fsetxattrat)."""
        guard = setid_guard() if shares else b""
        proc = proc or bool(shares)
        if accel != "kvm":
            return cls(root, kernel, uid, proc=proc, shares=shares, guard=guard)
        return cls(root, kernel, uid, (*cls.devices, "/dev/kvm"), (os.stat("/dev/kvm").st_gid,), proc=proc,
                   shares=shares, guard=guard)

    KERNEL = "/vmlinux"
    SHARES = "/shares"

    @classmethod
    def share_path(cls, tag: str) -> str:
        return f"{cls.SHARES}/{tag}"

    def enter(self) -> None:
        """In the child: the namespace, the jail's mounts, chroot into it, then the VM's uid with no groups."""
        # Nothing is imported here: this runs between fork and exec. Namespaces of its own for the mounts, the
        # network (it reaches its TAP and sockets by descriptor, and nothing else: no host service, no other VM)
        # and System V IPC.
        unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC)
        # Nothing mounted here reaches the host's namespace. A share that follows the host needs the host's mounts
        # to reach this one: slaves, then, and every other mount of the jail made private once it is built.
        following = any(share.follows_host for share in self.shares)
        mount(None, "/", None, MS_REC | (MS_SLAVE if following else MS_PRIVATE))
        root = str(self.root)
        mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        for name in ("usr", "dev", "tmp", *(("proc",) if self.proc else ()), *(("shares",) if self.shares else ())):
            os.mkdir(f"{root}/{name}")
            os.chmod(f"{root}/{name}", 0o755)  # the monitor's umask is 077
        for link in ("lib", "lib64", "bin", "sbin"):
            if os.path.islink(f"/{link}"):
                os.symlink(os.readlink(f"/{link}"), f"{root}/{link}")
        mount("/usr", f"{root}/usr", None, MS_BIND | MS_REC)
        mount(None, f"{root}/usr", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        for device in self.devices:
            os.close(os.open(f"{root}{device}", os.O_CREAT | os.O_WRONLY, 0o600))
            mount(device, f"{root}{device}", None, MS_BIND)
        os.close(os.open(f"{root}{self.KERNEL}", os.O_CREAT | os.O_WRONLY, 0o600))
        mount(str(self.kernel), f"{root}{self.KERNEL}", None, MS_BIND)
        mount(None, f"{root}{self.KERNEL}", None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        if self.proc:
            mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY,
                  "subset=pid,hidepid=invisible")
        for share in self.shares:
            target = f"{root}{self.share_path(share.tag)}"
            os.mkdir(target, 0o700)
            mount(str(share.path), target, None, MS_BIND | MS_REC)
            read_only = MOUNT_ATTR_RDONLY if share.read_only else 0
            mount_setattr(target, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | read_only, 0, recursive=True,
                          propagation=0 if share.follows_host else MS_PRIVATE)
        if following:
            for bound in (f"{root}/usr", f"{root}{self.KERNEL}", *(f"{root}{device}" for device in self.devices)):
                mount(None, bound, None, MS_REC | MS_PRIVATE)
        os.chroot(root)
        os.chdir("/")
        if self.shares:
            self._keep_only(CAP_DAC_OVERRIDE)
        os.setgroups(list(self.groups))
        os.setgid(self.uid)
        os.setuid(self.uid)
        if self.shares:
            # setuid kept the permitted set (keepcaps); now only the one capability, ambient so that QEMU's exec
            # keeps it (no_new_privs does not block ambient capabilities, and no file can add any)
            capset(1 << CAP_DAC_OVERRIDE, 1 << CAP_DAC_OVERRIDE, 1 << CAP_DAC_OVERRIDE)
            ambient_raise(CAP_DAC_OVERRIDE)
            set_keepcaps(False)
        # A VMM may outlive its monitor (`ps` says "monitor lost", rm ends it): vmm_ids.allocate never gives a
        # uid that a process still runs as, so its uid is not another VM's meanwhile.
        set_no_new_privs()
        if self.guard:
            seccomp_set_filter(self.guard)

    @staticmethod
    def _keep_only(cap: int) -> None:
        """As root: every other capability out of the bounding set, and the permitted set kept across setuid."""
        for other in range(64):
            if other == cap:
                continue
            try:
                capbset_drop(other)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: past the kernel's last capability
                    raise
                break
        set_keepcaps(True)
