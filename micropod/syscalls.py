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
CLONE_NEWUTS = 0x04000000

PR_SET_CHILD_SUBREAPER = 36

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


def set_child_subreaper() -> None:
    """Make orphaned descendants reparent to us, as they would to PID 1."""
    _check(_prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl PR_SET_CHILD_SUBREAPER")


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
TUNSETIFF, TUNSETPERSIST = 0x400454CA, 0x400454CB
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def create_persistent_tap(name: str) -> None:
    """A TAP device that outlives this process, for a VMM to open by name later."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError as exc:
        raise OSError(exc.errno, f"ioctl(TUNSETIFF) for {name}: {exc.strerror}") from None
    finally:
        os.close(fd)
