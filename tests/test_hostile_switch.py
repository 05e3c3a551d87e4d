"""The test-only handover switch: the host puts it on the kernel command line, and the agent then hands its
channel to the container's script (micropod/agent/handover.py), as tests/test_e2e_hostile.py relies on."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from micropod import guestmsg, wire
from micropod.paths import VmDir
from micropod.runconfig import ContainerSpec, RunConfig
from micropod.vmm import factory, snapshot
from tests import hostile_guest
from tests.test_agent import Session, rootfs  # noqa: F401  (fixture)


def run_config(tmp_path: Path) -> RunConfig:
    for name in ("vmlinux", "system.sqfs", "rootfs.sqfs"):
        (tmp_path / name).write_bytes(b"x")
    return RunConfig(vm_id="a" * 64, name="n", image="hostile", image_id="b" * 64, backend="qemu",
                     kernel=str(tmp_path / "vmlinux"), system=str(tmp_path / "system.sqfs"),
                     rootfs=str(tmp_path / "rootfs.sqfs"), vcpus=1, memory_mib=256,
                     container=ContainerSpec(args=("/hostile.py",), env=()))


def test_the_switch_is_on_the_command_line_only_when_the_host_asks(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, vm_dir = run_config(tmp_path), VmDir(tmp_path / "vm")
    (tmp_path / "vm").mkdir()
    (tmp_path / "vm" / "upper.ext4").write_bytes(b"")
    monkeypatch.delenv(factory.HOSTILE_GUEST_ENV, raising=False)
    plain = factory.build_spec(cfg, vm_dir)
    assert "HANDOVER" not in plain.cmdline
    monkeypatch.setenv(factory.HOSTILE_GUEST_ENV, "0")
    assert factory.build_spec(cfg, vm_dir).cmdline == plain.cmdline
    monkeypatch.setenv(factory.HOSTILE_GUEST_ENV, "1")
    hostile = factory.build_spec(cfg, vm_dir)
    assert hostile.cmdline.split() == [*plain.cmdline.split(), "MICROPOD_AGENT_HANDOVER=1"]
    # A boot snapshot of one never serves the other.
    binary = tmp_path / "vmlinux"
    assert snapshot.snapshot_key(plain, [], binary) != snapshot.snapshot_key(hostile, [], binary)


def test_the_agent_hands_its_channel_to_the_script(tmp_path: Path, rootfs: Path) -> None:  # noqa: F811
    shutil.copy(hostile_guest.__file__, rootfs / "hostile.py")
    session = Session(tmp_path, env={"MICROPOD_AGENT_HANDOVER": "1"})
    try:
        kind, _, payload = session.recv()
        assert kind == wire.CONTROL and wire.decode_control(payload)["op"] == "hello"
        session.create(rootfs, args=["/hostile.py", "idle"])
        assert session.ok("start", id="main")["pid"] == session.proc.pid  # the agent itself, about to exec
        assert session.recv() == (wire.DATA, wire.stream_id(1, wire.STDOUT), b"ready\n")
        # From here the script answers: it proves it owns the fd the agent had.
        assert session.ok("stats")["cpus"] == 1
        assert session.ok("shutdown")["op"] == "ok"
        assert session.exit_code("the script's exit") == 0
    finally:
        session.close()


def test_without_an_absolute_script_the_agent_refuses_and_stays(tmp_path: Path, rootfs: Path) -> None:  # noqa: F811
    session = Session(tmp_path, env={"MICROPOD_AGENT_HANDOVER": "1"})
    try:
        session.create(rootfs, args=["hostile.py"])
        reply = session.request("start", id="main")
        assert reply["op"] == "error" and "absolute script path" in reply["message"]
        assert session.ok("stats")["cpus"] >= 1  # still the agent
    finally:
        session.close()


def test_the_malformed_scenario_sends_only_what_the_host_must_refuse() -> None:
    """The e2e test counts one monitor.log refusal per bad message; here, that each is bad on its own."""
    routed = 0  # well formed, refused by the monitor's routing: a reply nobody awaits, a session that is not there
    for payload in hostile_guest.bad_messages("main"):
        try:
            guestmsg.parse(payload)
        except guestmsg.BadGuestMessage:
            continue
        routed += 1
    assert routed == 2


def test_the_flood_pattern_is_positional() -> None:
    whole = hostile_guest.pattern(0, 1000)
    assert hostile_guest.pattern(300, 700) == whole[300:]
    assert len(hostile_guest.pattern(12345, hostile_guest.CHUNK)) == hostile_guest.CHUNK
