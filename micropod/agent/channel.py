"""The agent's one connection to the host.

QEMU gives the guest a virtio-serial port named ``micropod.agent`` (this host has no vhost-vsock);
Firecracker gives it vsock, where the agent listens and the host connects through Firecracker's
hybrid vsock socket. Tests use a unix socket the test listens on. All three are a plain fd that
the agent reads without blocking and writes with a bounded wait, so that a host which stops reading
slows the container's output down instead of growing the agent's memory.
"""

from __future__ import annotations

import _socket
import errno
import os
import select
import time

from micropod import wire

SERIAL_PORTS = "/sys/class/virtio-ports"
VIRTIO_DEVICES = "/sys/bus/virtio/devices"
_VIRTIO_ID_VSOCK = 19
_LOST_ERRNOS = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ENODEV, errno.EIO)


class ChannelLost(Exception):
    """The host end went away, or stopped reading for longer than we wait."""


class Channel:
    def __init__(self, fd: int, kind: str, owner: object = None) -> None:
        self.fd = fd
        self.kind = kind
        self._owner = owner  # the socket object, kept alive so it does not close the fd
        self.reader = wire.FrameReader()
        os.set_blocking(fd, False)

    def read(self) -> bytes | None:
        """Bytes from the host; None if none are ready; b"" once the host has gone."""
        try:
            return os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in _LOST_ERRNOS:
                return b""
            raise

    def send(self, frame: bytes, stall_timeout: float | None = None) -> None:
        """Write a whole frame; wait while the host does not read, up to ``stall_timeout`` at a time.

        No limit by default: the monitor stops reading on purpose while a slow attached client catches
        up (back-pressure), and a host that went away closes the channel rather than stalling it."""
        view = memoryview(frame)
        while view:
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                _, writable, _ = select.select([], [self.fd], [], stall_timeout)
                if not writable:
                    raise ChannelLost(f"the host has not read from the channel for {stall_timeout}s") from None
                continue
            except OSError as exc:
                if exc.errno in _LOST_ERRNOS:
                    raise ChannelLost(f"channel write failed: {exc.strerror}") from exc
                raise
            view = view[written:]

    def close(self) -> None:
        os.close(self.fd)
        self._owner = None


def connect_unix(path: str) -> Channel:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.connect(path)
    fd = sock.detach()
    return Channel(fd, "unix")


class VsockListener:
    """Listens on the agent port; the host may connect again after a lost connection."""

    def __init__(self, port: int) -> None:
        import socket  # only on Firecracker, which boots with KVM and can afford its enum import

        self._sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        self._sock.bind((socket.VMADDR_CID_ANY, port))
        self._sock.listen(1)
        self.fd = self._sock.fileno()

    def accept(self) -> Channel:
        conn, _ = self._sock.accept()
        return Channel(conn.detach(), "vsock")


def find_serial_port(name: str) -> str | None:
    """The /dev node of the virtio-serial port the host named ``name``."""
    try:
        ports = sorted(os.listdir(SERIAL_PORTS))
    except FileNotFoundError:
        return None
    for port in ports:
        try:
            with open(f"{SERIAL_PORTS}/{port}/name", encoding="utf-8") as file:
                if file.read().strip() == name:
                    return f"/dev/{port}"
        except OSError:
            continue
    return None


def has_vsock_device() -> bool:
    try:
        devices = os.listdir(VIRTIO_DEVICES)
    except FileNotFoundError:
        return False
    for device in devices:
        try:
            with open(f"{VIRTIO_DEVICES}/{device}/device", encoding="ascii") as file:
                if int(file.read().strip(), 16) == _VIRTIO_ID_VSOCK:
                    return True
        except (OSError, ValueError):
            continue
    return False


def open_guest_channel(mode: str, serial_name: str, vsock_port: int,
                       timeout: float = 10.0) -> tuple[Channel | None, VsockListener | None]:
    """The channel in a real guest: ``mode`` is serial, vsock or auto (whichever device exists).

    With vsock the host connects later, so this returns only the listener. A serial port's name
    arrives from the host shortly after the device is probed, hence the bounded polling.
    """
    deadline = time.monotonic() + timeout
    while True:
        if mode in ("serial", "auto"):
            path = find_serial_port(serial_name)
            if path is not None:
                return Channel(os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC), "serial"), None
        if mode == "vsock" or (mode == "auto" and has_vsock_device()):
            return None, VsockListener(vsock_port)
        if time.monotonic() > deadline:
            raise OSError(errno.ENODEV, f"no virtio-serial port named {serial_name} and no vsock device "
                                        f"after {timeout:.0f}s (channel mode {mode})")
        time.sleep(0.01)
