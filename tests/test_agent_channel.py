"""Finding the host channel in a guest, and the channel's read/write behaviour."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from micropod import syscalls, wire
from micropod.agent import boot
from micropod.agent import channel as channels


def test_finds_the_named_virtio_serial_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for port, name in (("vport0p0", "org.qemu.guest_agent.0"), ("vport1p1", "micropod.agent")):
        (tmp_path / port).mkdir()
        (tmp_path / port / "name").write_text(name + "\n")
    (tmp_path / "vport2p1").mkdir()  # a port whose name has not arrived yet
    monkeypatch.setattr(channels, "SERIAL_PORTS", str(tmp_path))
    assert channels.find_serial_port("micropod.agent") == "/dev/vport1p1"
    assert channels.find_serial_port("other") is None
    monkeypatch.setattr(channels, "SERIAL_PORTS", str(tmp_path / "missing"))
    assert channels.find_serial_port("micropod.agent") is None


def test_detects_a_vsock_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channels, "VIRTIO_DEVICES", str(tmp_path))
    (tmp_path / "virtio0").mkdir()
    (tmp_path / "virtio0" / "device").write_text("0x0002\n")  # block
    assert not channels.has_vsock_device()
    (tmp_path / "virtio1").mkdir()
    (tmp_path / "virtio1" / "device").write_text("0x0013\n")
    assert channels.has_vsock_device()


def test_no_channel_device_is_a_bounded_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channels, "SERIAL_PORTS", str(tmp_path))
    monkeypatch.setattr(channels, "VIRTIO_DEVICES", str(tmp_path))
    with pytest.raises(OSError, match=r"no virtio-serial port named micropod\.agent"):
        channels.open_guest_channel("auto", "micropod.agent", 1024, timeout=0.05)


def test_read_write_and_loss() -> None:
    ours, theirs = socket.socketpair()
    channel = channels.Channel(ours.detach(), "unix")
    assert channel.read() is None
    theirs.sendall(b"abc")
    assert channel.read() == b"abc"
    frame = wire.encode_control({"op": "hello", "version": 1})
    channel.send(frame)
    assert theirs.recv(100) == frame
    theirs.close()
    assert channel.read() == b""
    with pytest.raises(channels.ChannelLost):
        channel.send(frame)
    channel.close()


def test_a_host_that_stops_reading_is_lost_after_the_stall_timeout() -> None:
    ours, theirs = socket.socketpair()
    channel = channels.Channel(ours.detach(), "unix")
    with pytest.raises(channels.ChannelLost, match="has not read"):
        channel.send(b"x" * (8 << 20), stall_timeout=0.05)
    channel.close()
    theirs.close()


def test_config_from_environment() -> None:
    config = boot.Config({})
    assert (config.channel, config.test_mode, config.grace, config.mount_base) == ("auto", False, 10.0, "/mnt")
    assert config.reboot == syscalls.LINUX_REBOOT_CMD_RESTART
    config = boot.Config({"MICROPOD_AGENT_CHANNEL": "unix:/x", "MICROPOD_AGENT_REBOOT": "poweroff",
                          "MICROPOD_AGENT_GRACE": "2.5"})
    assert (config.test_mode, config.grace) == (True, 2.5)
    assert config.reboot == syscalls.LINUX_REBOOT_CMD_POWER_OFF
