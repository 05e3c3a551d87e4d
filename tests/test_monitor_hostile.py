"""The monitor against a hostile guest, with no VM: its agent channel is one end of a socketpair that each
test scripts as the guest (issue 9, points 5 and 6)."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from micropod import guestmsg, wire
from micropod.channel import OUT_LIMIT, AgentLink, FramedSocket
from micropod.errors import ContainerCommandError, printable
from micropod.monitor.client import MonitorClient
from micropod.monitor.clients import HIGH_WATER
from micropod.monitor.supervisor import Monitor
from micropod.paths import StateRoot
from micropod.runconfig import ContainerSpec, RunConfig

VM_ID = "a" * 64


@dataclass
class Rig:
    monitor: Monitor
    guest: socket.socket  # the agent's end, blocking
    attached: socket.socket  # `run`'s attached client, blocking

    def step(self, timeout: float = 0.5) -> None:
        """One turn of the monitor's loop (Monitor._loop's body)."""
        self.monitor._update_watch()
        for what, mask in self.monitor.watch.ready(timeout):
            self.monitor._dispatch(what, mask)

    def run_until(self, done: object, turns: int = 10_000) -> None:
        for _ in range(turns):
            if done():  # type: ignore[operator]
                return
            self.step()
        raise AssertionError("the monitor did not get there")

    def send_guest(self, message: bytes) -> None:
        """A control frame from the guest, sent from a thread: it may be bigger than the socket's buffer."""
        frame = wire.HEADER.pack(wire.CONTROL, 0, len(message)) + message
        threading.Thread(target=self.guest.sendall, args=(frame,), daemon=True).start()

    def close(self) -> None:
        for sock in (self.guest, self.attached):
            sock.close()


def make_rig(tmp_path: Path, stdin: bool = False) -> Rig:
    root = StateRoot(tmp_path / "root")
    vm_dir = root.vm(VM_ID)
    vm_dir.path.mkdir(parents=True)
    RunConfig(vm_id=VM_ID, name="n", image="hello", image_id="b" * 64, backend="qemu", kernel="/k", system="/s",
              rootfs="/r", vcpus=1, memory_mib=128,
              container=ContainerSpec(args=("sh",), env=(), stdin=stdin)).dump(vm_dir.config)
    host, guest = socket.socketpair()
    attached, attached_monitor_end = socket.socketpair()
    monitor = Monitor(root, VM_ID, attached_monitor_end)
    monitor.vm.link = AgentLink(FramedSocket(host), monitor._on_frame)
    monitor.clients.listen()
    monitor.watch.watch(host, "agent")
    return Rig(monitor, guest, attached)


def connect(rig: Rig) -> socket.socket:
    """Another CLI client on the monitor's control socket, accepted."""
    client = MonitorClient.connect(rig.monitor.vm_dir).channel.sock
    count = len(rig.monitor.clients.clients)
    rig.run_until(lambda: len(rig.monitor.clients.clients) > count)
    return client


# -- point 6: every guest message is checked -------------------------------------------------------------------

DEEP = b'{"op":"log","message":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
BAD_MESSAGES = {
    "huge exit code": b'{"op":"exit","id":"main","sid":1,"code":1099511627776}',
    "negative exit code": b'{"op":"exit","id":"main","sid":1,"code":-1}',
    "exit code as a string": b'{"op":"exit","id":"main","sid":1,"code":"3"}',
    "exit code as a bool": b'{"op":"exit","id":"main","sid":1,"code":true}',
    "exit code infinite": b'{"op":"exit","id":"main","sid":1,"code":1e400}',
    "exit code NaN": b'{"op":"exit","id":"main","sid":1,"code":NaN}',
    "exit of a session that does not exist": b'{"op":"exit","id":"main","sid":77,"code":0}',
    "sid out of range": b'{"op":"exit","id":"main","sid":4294967296,"code":0}',
    "deep JSON": DEEP,
    "unknown op": b'{"op":"format-the-host"}',
    "syslog message not a string": b'{"op":"syslog","id":"main","message":["x"]}',
    "log without message": b'{"op":"log"}',
    "reply nobody waits for": b'{"op":"ok","req":999}',
    "reply with a bad req": b'{"op":"error","req":"1","message":"x","code":1}',
    "oversized control message": b'{"op":"log","message":"' + b"x" * (guestmsg.MAX_CONTROL + 1) + b'"}',
}


@pytest.mark.parametrize("payload", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
def test_a_bad_guest_message_is_refused_with_one_line(tmp_path: Path, payload: bytes,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    rig = make_rig(tmp_path)
    guestmsg.refusals.count = 0
    with caplog.at_level(logging.WARNING, "micropod.monitor"):
        rig.send_guest(payload)
        rig.run_until(lambda: guestmsg.refusals.count == 1)
    assert rig.monitor.exit_code is None
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1
    # the monitor goes on: the next good message is acted on
    rig.send_guest(b'{"op":"exit","id":"main","sid":1,"code":3}')
    rig.run_until(lambda: rig.monitor.exit_code is not None)
    assert rig.monitor.exit_code == 3
    rig.close()


BAD_STREAMS = {
    "stdin from the guest": wire.stream_id(1, wire.STDIN),
    "fd 3": wire.stream_id(1, 3),
    "a session that does not exist": wire.stream_id(9, wire.STDOUT),
}


@pytest.mark.parametrize("stream", BAD_STREAMS.values(), ids=BAD_STREAMS.keys())
def test_data_on_a_stream_that_does_not_exist_is_refused(tmp_path: Path, stream: int) -> None:
    rig = make_rig(tmp_path)
    guestmsg.refusals.count = 0
    rig.guest.sendall(wire.encode(wire.DATA, stream, b"\x1b[2Jboo"))
    rig.run_until(lambda: guestmsg.refusals.count == 1)
    rig.guest.sendall(wire.encode(wire.DATA, wire.stream_id(1, wire.STDOUT), b"ok\n"))
    log = rig.monitor.vm_dir.container_log
    rig.run_until(lambda: log.exists() and log.stat().st_size > 0)
    assert b"boo" not in log.read_bytes()
    rig.close()


def test_an_oversized_frame_closes_the_channel_and_the_monitor_lives(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    rig = make_rig(tmp_path)
    guestmsg.refusals.count = 20  # past the first lines: a broken channel is logged however many came before
    rig.guest.sendall(wire.HEADER.pack(wire.DATA, 5, wire.MAX_PAYLOAD + 1))
    rig.run_until(lambda: rig.monitor.vm.link is not None and rig.monitor.vm.link.channel.closed)
    assert "the agent channel broke" in caplog.text
    assert rig.monitor.kill_deadline is not None  # the VM gets its grace, then the kill
    rig.close()


def test_refusals_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    refusals = guestmsg.Refusals(first=3, every=100)
    with caplog.at_level(logging.WARNING, "micropod.monitor"):
        for _ in range(1000):
            refusals.refuse("junk \x1b[31m")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 + 10
    assert "(1000 so far)" in lines[-1] and "\x1b" not in "".join(lines)


def test_stats_with_infinite_or_missing_counters_are_refused(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    client = connect(rig)
    guestmsg.refusals.count = 0
    client.sendall(wire.encode_control({"op": "stats"}))
    rig.run_until(lambda: rig.monitor.vm.pending)
    rig.send_guest(b'{"op":"ok","req":1,"cpu_total":1e400}')  # not even its req can be trusted: no answer
    rig.run_until(lambda: guestmsg.refusals.count == 1)
    good = {name: 1 for name in guestmsg.STATS_FIELDS}
    for reply in (b'{"op":"ok","req":2,"cpu_total":1}',
                  b'{"op":"ok","req":3,' + json.dumps({**good, "cpu_total": -1}).encode()[1:],
                  b'{"op":"ok","req":4,' + json.dumps(good).encode()[1:]):
        client.sendall(wire.encode_control({"op": "stats"}))
        rig.run_until(lambda r=reply: int(r.split(b'"req":')[1].split(b",")[0]) in rig.monitor.vm.pending)
        rig.send_guest(reply)
        answer = _control(client, rig)
        assert answer["op"] == "stats-reply"
        if reply.startswith(b'{"op":"ok","req":4'):
            assert answer["cpu_total"] == 1 and answer["net_rx"] == 0
        else:
            assert "message" in answer and "cpu_total" not in answer
    assert rig.monitor.exit_code is None
    client.close()
    rig.close()


def _control(sock: socket.socket, rig: Rig) -> dict[str, Any]:
    """The next control message the monitor sends ``sock``, turning the monitor's loop meanwhile."""
    sock.setblocking(False)
    reader = wire.FrameReader()
    frames: list[tuple[int, int, bytes]] = []
    for _ in range(1000):
        rig.step(0.05)
        with contextlib.suppress(BlockingIOError):
            frames += reader.feed(sock.recv(1 << 16))
        controls = [f for f in frames if f[0] == wire.CONTROL]
        if controls:
            return wire.decode_control(controls[0][2])
    raise AssertionError("no answer")


def test_agent_error_strings_are_escaped_for_the_terminal() -> None:
    assert printable("a\x1b]0;pwned\x07b\rc\x9bd\n\te") == "a\\x1b]0;pwned\\x07b\\x0dc\\x9bd\n\te"
    assert str(ContainerCommandError("exec: \x1b[2Jgone", 127)) == "exec: \\x1b[2Jgone"


def test_an_exit_error_from_the_guest_reaches_clients_escaped(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    rig.monitor._set_exit(125, "boot: \x1b[2J\x1b[Hfake prompt $ ")
    assert rig.monitor.error is not None and "\x1b" not in rig.monitor.error
    rig.close()


# -- point 5: back-pressure both ways ---------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_a_guest_flood_waits_for_a_slow_attached_client(tmp_path: Path) -> None:
    """8 MiB from the guest and a client reading 32 KiB per turn: it gets every byte in order, is never
    dropped, and no buffer of the monitor grows past its bound."""
    rig = make_rig(tmp_path)
    total, chunk = 2 * OUT_LIMIT, 60_000
    data = bytes(random.Random(1).getrandbits(8) for _ in range(1 << 16)) * (total >> 16)
    stream = wire.stream_id(1, wire.STDOUT)

    def guest() -> None:
        with contextlib.suppress(OSError):
            for start in range(0, total, chunk):
                rig.guest.sendall(wire.encode(wire.DATA, stream, data[start:start + chunk]))

    writer = threading.Thread(target=guest, daemon=True)
    writer.start()
    (held,) = rig.monitor.clients.attached
    rig.attached.setblocking(False)
    reader = wire.FrameReader()
    got = bytearray()
    link = rig.monitor.vm.link
    assert link is not None
    most_queued = most_pending = 0
    while len(got) < total:
        rig.step(0.05)
        assert held in rig.monitor.clients.attached, "the attached client was dropped"
        client = rig.monitor.clients.clients[held]
        most_queued = max(most_queued, client.backlog)
        most_pending = max(most_pending, link.channel._reader.pending)
        with contextlib.suppress(BlockingIOError):
            for kind, _, payload in reader.feed(rig.attached.recv(32 << 10)):
                assert kind == wire.DATA
                got += payload
    writer.join(timeout=30)
    assert bytes(got) == data
    assert len(rig.monitor.clients.attached) == 1
    assert most_queued <= HIGH_WATER + wire.MAX_PAYLOAD + (64 << 10) + (64 << 10)
    assert most_pending <= wire.MAX_PAYLOAD + wire.HEADER.size
    rig.close()


@pytest.mark.timeout(120)
def test_a_guest_that_never_reads_does_not_freeze_kill(tmp_path: Path) -> None:
    """An attached client pours stdin into a guest that reads nothing: the monitor queues a bounded amount,
    stops reading that client, and still serves a `stop` and a `kill` from other clients."""
    rig = make_rig(tmp_path, stdin=True)
    link = rig.monitor.vm.link
    assert link is not None
    rig.attached.setblocking(False)
    sent = 0
    block = wire.encode(wire.DATA, wire.STDIN, b"y" * 60_000)
    most_queued = 0
    for _ in range(2000):  # far more than any bound: the monitor must push back
        with contextlib.suppress(BlockingIOError):
            sent += rig.attached.send(block)
        rig.step(0.01)
        most_queued = max(most_queued, link.channel.backlog)
        paused = not rig.monitor.watch.events(rig.monitor.clients.clients[max(rig.monitor.clients.clients)].sock)
        if rig.monitor.vm.congested and paused:
            break
    assert rig.monitor.vm.congested
    for _ in range(20):  # paused: nothing more is taken from the client
        rig.step(0.01)
        assert link.channel.backlog == most_queued
    assert most_queued <= OUT_LIMIT
    assert rig.monitor.exit_code is None  # a busy guest is not a dead one
    stopper = connect(rig)
    stopper.sendall(wire.encode_control({"op": "stop", "timeout": 30}))
    rig.run_until(lambda: rig.monitor.kill_deadline is not None)
    killer = connect(rig)
    killer.sendall(wire.encode_control({"op": "kill"}))
    rig.run_until(lambda: rig.monitor.done)
    assert rig.monitor.exit_code == 137
    for sock in (stopper, killer):
        sock.close()
    rig.close()


def test_a_client_that_reads_nothing_and_is_not_held_is_dropped(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    rig = make_rig(tmp_path)
    idle = connect(rig)
    fd = max(rig.monitor.clients.clients)
    with caplog.at_level(logging.WARNING, "micropod.monitor"):
        for _ in range(OUT_LIMIT // 60_000 + 10):
            rig.monitor.clients.broadcast({"op": "noise", "x": "z" * 60_000}, only_attached=False)
            if fd not in rig.monitor.clients.clients:
                break
    assert fd not in rig.monitor.clients.clients
    assert any("dropping client" in r.getMessage() for r in caplog.records)
    idle.close()
    rig.close()


# -- stats: one silent guest holds nobody up -------------------------------------------------------------------

def test_stats_gives_up_on_a_silent_vm_and_reads_the_others() -> None:
    from micropod.service.stats import sample_all

    answering, answering_monitor = socket.socketpair()
    silent, silent_monitor = socket.socketpair()
    clients = {"good": MonitorClient(answering), "silent": MonitorClient(silent)}
    counters = {name: 2 for name in guestmsg.STATS_FIELDS}
    answering_monitor.sendall(wire.encode_control({"op": "stats-reply", **counters}))
    taken = sample_all(clients, timeout=0.5)
    assert taken["silent"] is None
    assert taken["good"] is not None and taken["good"].cpus == 2
    assert "silent" not in clients  # closed: its late answer cannot be misread as the next one
    for sock in (answering_monitor, silent_monitor):
        sock.close()
    clients["good"].close()


def test_the_monitor_log_is_capped_however_much_a_guest_makes_it_write(tmp_path: Path) -> None:
    from micropod.monitor.main import MONITOR_LOG_MAX, capped_log_handler

    handler = capped_log_handler(tmp_path / "monitor.log")
    logger = logging.getLogger("test.capped")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for _ in range((3 * MONITOR_LOG_MAX) // 1000):
            logger.warning("x" * 1000)
    finally:
        handler.close()
        logger.removeHandler(handler)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["monitor.log", "monitor.log.1"]
    assert all((tmp_path / name).stat().st_size <= MONITOR_LOG_MAX for name in files)
