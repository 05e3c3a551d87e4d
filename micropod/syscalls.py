"""micropod's one module of raw system calls.

Everything the standard library does not wrap (mount, umount2, reboot, unshare, prctl) goes through
ctypes here, with argtypes declared and errno checked, and a failure raises ``OSError`` whose message
names the call and its arguments. The terminal ioctls live here too, so that the rest of the code
never speaks to the kernel in numbers.

Standard library only, and cheap to import: the guest agent runs this module on its boot path.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_STRICTATIME = 0x1000000

MNT_FORCE = 0x1
MNT_DETACH = 0x2

LINUX_REBOOT_CMD_RESTART = 0x01234567
LINUX_REBOOT_CMD_HALT = 0xCDEF0123
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080
MS_UNBINDABLE = 0x20000
MS_SHARED = 0x100000

PR_SET_CHILD_SUBREAPER = 36
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
SYS_PIVOT_ROOT = 155  # x86_64; glibc has no wrapper
SYS_MOUNT_SETATTR = 442  # the same on every architecture (asm-generic); glibc 2.36 has no wrapper either
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
SYS_OPEN_TREE = 428  # asm-generic numbers, as mount_setattr's
SYS_MOVE_MOUNT = 429
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4

# asm-generic/ioctls.h, the same on x86_64 and arm64.
TIOCSCTTY = 0x540E
TIOCSWINSZ = 0x5414
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441

_libc = ctypes.CDLL(None, use_errno=True)

_mount = _libc.mount
_mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_mount.restype = ctypes.c_int

_umount2 = _libc.umount2
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_umount2.restype = ctypes.c_int

_reboot = _libc.reboot
_reboot.argtypes = [ctypes.c_int]
_reboot.restype = ctypes.c_int

_unshare = _libc.unshare
_unshare.argtypes = [ctypes.c_int]
_unshare.restype = ctypes.c_int

_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def _check(result: int, call: str) -> None:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{call}: {os.strerror(err)}")


def _bytes(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    result = _mount(_bytes(source), _bytes(target), _bytes(fstype), flags, _bytes(data))
    _check(result, f"mount {source or 'none'} on {target} (type {fstype or 'none'}, flags {flags:#x}"
                   f"{', ' + data if data else ''})")


def umount2(target: str, flags: int = 0) -> None:
    _check(_umount2(_bytes(target), flags), f"umount2 {target}")


def reboot(cmd: int) -> None:
    """reboot(2); returns only on failure. Needs CAP_SYS_BOOT and ends the machine."""
    # The magic numbers exceed INT_MAX; the C prototype takes them as a (wrapped) int.
    signed = cmd - (1 << 32) if cmd >= 1 << 31 else cmd
    _check(_reboot(signed), f"reboot {cmd:#x}")


def unshare(flags: int) -> None:
    _check(_unshare(flags), f"unshare {flags:#x}")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), f"setns {nstype:#x}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def mount_setattr(target: str, attr_set: int, attr_clr: int, recursive: bool = True, propagation: int = 0) -> None:
    """mount_setattr(2) on ``target`` (and, recursively, every mount below it): MOUNT_ATTR_* bits, and MS_PRIVATE,
    MS_SLAVE or MS_SHARED as ``propagation`` (0: unchanged)."""
    attr = _MountAttr(attr_set, attr_clr, propagation, 0)
    flags = AT_RECURSIVE if recursive else 0
    result = _libc.syscall(SYS_MOUNT_SETATTR, -100, _bytes(target), flags, ctypes.byref(attr),
                           ctypes.sizeof(attr))  # -100: AT_FDCWD
    _check(result, f"mount_setattr {target} (set {attr_set:#x}, clear {attr_clr:#x})")


def open_tree_clone(path: str) -> int:
    """A detached bind mount of ``path`` (open_tree(2) with OPEN_TREE_CLONE), as a descriptor: nothing sees it
    until move_mount places it."""
    fd = _libc.syscall(SYS_OPEN_TREE, -100, _bytes(path), OPEN_TREE_CLONE | os.O_CLOEXEC)
    _check(fd, f"open_tree {path}")
    return int(fd)


def mount_setattr_fd(mount_fd: int, attr_set: int, propagation: int = 0) -> None:
    """mount_setattr(2) on the mount that ``mount_fd`` is (a detached one from open_tree_clone, say)."""
    attr = _MountAttr(attr_set, 0, propagation, 0)
    _check(_libc.syscall(SYS_MOUNT_SETATTR, mount_fd, b"", AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)),
           f"mount_setattr (set {attr_set:#x})")


def move_mount_onto(mount_fd: int, target_fd: int) -> None:
    """The mount ``mount_fd`` placed on what ``target_fd`` (an O_PATH descriptor) is: no path is resolved."""
    _check(_libc.syscall(SYS_MOVE_MOUNT, mount_fd, b"", target_fd, b"",
                         MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH), "move_mount")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(SYS_PIVOT_ROOT, _bytes(new_root), _bytes(put_old)), f"pivot_root {new_root}")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def setdomainname(name: str) -> None:
    raw = name.encode()
    _check(_libc.setdomainname(raw, len(raw)), "setdomainname")


def set_dumpable(dumpable: bool) -> None:
    """Not dumpable: other processes (a container's, once we join its pid namespace) cannot open our
    /proc/PID/exe, fds or memory; execve resets it for the program that follows."""
    _check(_prctl(PR_SET_DUMPABLE, int(dumpable), 0, 0, 0), "prctl PR_SET_DUMPABLE")


def set_no_new_privs() -> None:
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl PR_SET_NO_NEW_PRIVS")


def set_child_subreaper() -> None:
    """Make orphaned descendants reparent to us, as they would to PID 1."""
    _check(_prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl PR_SET_CHILD_SUBREAPER")


# Capabilities: <linux/prctl.h> and <linux/capability.h>. Sets are 64-bit masks, bit N = capability N.
PR_SET_KEEPCAPS = 8
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_CapDataV3 = _CapData * 2  # version 3 splits each 64-bit set into two 32-bit words, low word first

_libc.capget.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]


def capget(pid: int = 0) -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of ``pid`` (0: the calling thread)."""
    header, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, pid), _CapDataV3()
    _check(_libc.capget(ctypes.byref(header), data), f"capget {pid}")
    low, high = data[0], data[1]
    return (low.effective | high.effective << 32, low.permitted | high.permitted << 32,
            low.inheritable | high.inheritable << 32)


def capset(effective: int, permitted: int, inheritable: int) -> None:
    data = _CapDataV3()
    for word in (0, 1):
        shift = 32 * word
        data[word].effective = effective >> shift & 0xFFFFFFFF
        data[word].permitted = permitted >> shift & 0xFFFFFFFF
        data[word].inheritable = inheritable >> shift & 0xFFFFFFFF
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    _check(_libc.capset(ctypes.byref(header), data),
           f"capset effective={effective:#x} permitted={permitted:#x} inheritable={inheritable:#x}")


def capbset_read(cap: int) -> bool:
    result: int = _prctl(PR_CAPBSET_READ, cap, 0, 0, 0)
    _check(result, f"prctl PR_CAPBSET_READ {cap}")
    return result == 1


def capbset_drop(cap: int) -> None:
    _check(_prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"prctl PR_CAPBSET_DROP {cap}")


def set_keepcaps(keep: bool) -> None:
    _check(_prctl(PR_SET_KEEPCAPS, int(keep), 0, 0, 0), "prctl PR_SET_KEEPCAPS")


def ambient_raise(cap: int) -> None:
    _check(_prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0), f"prctl PR_CAP_AMBIENT_RAISE {cap}")


def ambient_clear_all() -> None:
    _check(_prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl PR_CAP_AMBIENT_CLEAR_ALL")


def open_pty(ptmx: str) -> tuple[int, int]:
    """A (master, slave) pair from the devpts instance that owns ``ptmx``; both close on exec.

    os.openpty() would use the caller's /dev/ptmx; a container must get a slave from its own
    devpts so that ttyname() inside it finds /dev/pts/N.
    """
    master = os.open(ptmx, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        os.close(master)
        raise OSError(exc.errno, f"open pty {ptmx}: {exc.strerror}") from exc
    return master, slave


def set_controlling_tty(fd: int) -> None:
    fcntl.ioctl(fd, TIOCSCTTY, 0)


def set_window_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


# ioctl numbers from <linux/fs.h> and <linux/random.h>.
BLKFLSBUF = 0x1261
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


def flush_block_device(device: str) -> None:
    """Drop the kernel's cached blocks of ``device`` (BLKFLSBUF)."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, BLKFLSBUF)
    except OSError as exc:
        raise OSError(exc.errno, f"ioctl(BLKFLSBUF) on {device}: {exc.strerror}") from None
    finally:
        os.close(fd)


def add_entropy(seed: bytes) -> None:
    """Credit ``seed`` to the kernel's pool and reseed the CRNG at once (RNDADDENTROPY, RNDRESEEDCRNG).

    VMs restored from one snapshot start with the same CRNG state; fresh host entropy makes them
    diverge before anything in the container draws a random number.
    """
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    except OSError as exc:
        raise OSError(exc.errno, f"ioctl(RNDADDENTROPY) on /dev/urandom: {exc.strerror}") from None
    finally:
        os.close(fd)


# <linux/if_tun.h>
TUNSETIFF, TUNSETPERSIST, TUNSETOWNER = 0x400454CA, 0x400454CB, 0x400454CC
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def create_persistent_tap(name: str) -> None:
    """A TAP device that outlives this process, for a VMM to open by name later."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        # Owned by root: no other user (a confined VMM's uid included) can attach to the TAP by name.
        fcntl.ioctl(fd, TUNSETOWNER, 0)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError as exc:
        raise OSError(exc.errno, f"ioctl(TUNSETIFF) for {name}: {exc.strerror}") from None
    finally:
        os.close(fd)


def open_tap(name: str) -> int:
    """A descriptor of the persistent TAP ``name``, for a VMM that cannot open it itself (it runs unprivileged)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError as exc:
        os.close(fd)
        raise OSError(exc.errno, f"ioctl(TUNSETIFF) for {name}: {exc.strerror}") from None
    return fd


# cgroups: statfs(2) tells a cgroup2 mount from a v1 one; bpf(2) loads cgroup v2 device filters.
_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, -1)
BPF_PROG_LOAD, BPF_PROG_ATTACH, BPF_PROG_DETACH, BPF_PROG_GET_FD_BY_ID, BPF_PROG_QUERY = 5, 8, 9, 13, 16
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6  # the attach type
BPF_F_ALLOW_MULTI = 2


def filesystem_magic(path: str) -> int:
    """statfs(2)'s f_type for ``path``: e.g. 0x63677270 on a cgroup2 mount."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit, f_type first
    _check(_libc.statfs(os.fsencode(path), buf), f"statfs {path}")
    return int(struct.unpack_from("l", buf)[0])


def _bpf(cmd: int, attr: bytes, call: str) -> tuple[int, bytes]:
    """bpf(2) with ``attr`` (zero-padded to 128 bytes); returns the result and the attr as the kernel left it."""
    if _SYS_BPF < 0:
        raise OSError(38, f"{call}: bpf(2) is not known on {os.uname().machine}")
    buf = ctypes.create_string_buffer(attr.ljust(128, b"\0"), 128)
    result = _libc.syscall(_SYS_BPF, cmd, buf, 128)
    _check(result, call)
    return result, buf.raw


def bpf_load_device_filter(insns: bytes, license: str = "Apache") -> int:
    """Load a BPF_PROG_TYPE_CGROUP_DEVICE program; returns its fd (close-on-exec)."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    log = ctypes.create_string_buffer(0)
    for level in (0, 1):  # on failure, load again with the verifier's log to say why
        attr = struct.pack("=IIQQIIQII16sII", BPF_PROG_TYPE_CGROUP_DEVICE, len(insns) // 8, ctypes.addressof(code),
                           ctypes.addressof(lic), level, len(log), ctypes.addressof(log), 0, 0, b"micropod_dev", 0,
                           BPF_CGROUP_DEVICE)
        try:
            return _bpf(BPF_PROG_LOAD, attr, "bpf(BPF_PROG_LOAD, cgroup device filter)")[0]
        except OSError as exc:
            if level:
                raise OSError(exc.errno, f"{exc.strerror}: {log.value.decode(errors='replace').strip()}") from None
            log = ctypes.create_string_buffer(65536)
    raise AssertionError("unreachable")


def bpf_attach_device_filter(cgroup_fd: int, prog_fd: int) -> None:
    attr = struct.pack("=IIII", cgroup_fd, prog_fd, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI)
    _bpf(BPF_PROG_ATTACH, attr, "bpf(BPF_PROG_ATTACH, BPF_CGROUP_DEVICE)")


def bpf_detach_device_filter(cgroup_fd: int, prog_fd: int) -> None:
    _bpf(BPF_PROG_DETACH, struct.pack("=III", cgroup_fd, prog_fd, BPF_CGROUP_DEVICE),
         "bpf(BPF_PROG_DETACH, BPF_CGROUP_DEVICE)")


def bpf_device_filter_ids(cgroup_fd: int) -> list[int]:
    """The ids of the device filters attached to a cgroup (at most 64, the kernel's limit)."""
    ids = ctypes.create_string_buffer(64 * 4)
    attr = struct.pack("=IIIIQI", cgroup_fd, BPF_CGROUP_DEVICE, 0, 0, ctypes.addressof(ids), 64)
    _, out = _bpf(BPF_PROG_QUERY, attr, "bpf(BPF_PROG_QUERY, BPF_CGROUP_DEVICE)")
    count = struct.unpack_from("=I", out, 24)[0]
    return list(struct.unpack_from(f"={count}I", ids.raw))


def bpf_program_fd(prog_id: int) -> int:
    return _bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("=I", prog_id), f"bpf(BPF_PROG_GET_FD_BY_ID, {prog_id})")[0]


SYS_SECCOMP = 317  # x86_64
SECCOMP_SET_MODE_FILTER = 1


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_set_filter(program: bytes, flags: int = 0) -> None:
    """seccomp(SECCOMP_SET_MODE_FILTER): ``program`` is struct sock_filter[] (8 bytes each), as libseccomp
    exports it; needs no_new_privs or CAP_SYS_ADMIN."""
    buffer = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    _check(_libc.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(prog)), "seccomp")
