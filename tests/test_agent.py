"""The guest agent end to end, in test mode: a real agent process, a busybox container root, no VM.

The agent runs as it does in the guest (``python3.11 -I -S``) and connects to a unix socket this
test listens on; the test side speaks wire.py, so these tests also check that the agent's own
codec matches the contract. Needs root (chroot, mounts) and a static busybox.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from micropod import wire

REPO = Path(__file__).resolve().parent.parent
GUEST_LIKE_PYTHON = "/usr/bin/python3.11"
PYTHON = GUEST_LIKE_PYTHON if os.path.exists(GUEST_LIKE_PYTHON) else sys.executable
BUSYBOX = shutil.which("busybox")
BOOTSTRAP = f"import sys; sys.path.insert(0, {str(REPO)!r}); from micropod.agent.entry import main; main()"
TIMEOUT = 15.0
APPLETS = ("sh", "echo", "cat", "sleep", "id", "true", "false", "env", "pwd", "tty", "test", "ls", "kill",
           "readlink", "stat", "stty", "hostname", "setsid", "logger")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the agent chroots and mounts: needs root"),
    pytest.mark.skipif(BUSYBOX is None, reason="needs busybox for the container root"),
]


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    assert BUSYBOX is not None
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nalice:x:1000:\ndevs:x:1001:alice\nstaff:x:50:bob\n")
    (root / "root").mkdir()
    (root / "home" / "alice").mkdir(parents=True)
    os.chown(root / "home" / "alice", 1000, 1000)
    (root / "srv" / "data").mkdir(parents=True)
    notexec = root / "bin" / "notexec"
    notexec.write_text("#!/bin/sh\necho never\n")
    notexec.chmod(0o644)
    return root


class Session:
    """One agent process and the test's end of its channel."""

    def __init__(self, tmp_path: Path, env: dict[str, str] | None = None, wrapper: tuple[str, ...] = ()) -> None:
        self.tmp_path = tmp_path
        sock_path = tmp_path / "agent.sock"
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(sock_path))
        self.server.listen(1)
        self.server.settimeout(TIMEOUT)
        self.stderr_path = tmp_path / "agent.stderr"
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [*wrapper, PYTHON, "-I", "-S", "-c", BOOTSTRAP],
                env={"MICROPOD_AGENT_CHANNEL": f"unix:{sock_path}", **(env or {})},
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
            )
        try:
            self.conn, _ = self.server.accept()
        except TimeoutError:
            self.fail("the agent did not connect")
        self.conn.settimeout(TIMEOUT)
        self.backlog: list[tuple[int, int, bytes]] = []
        self.next_req = 0

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def fail(self, what: str) -> None:
        pytest.fail(f"{what}; agent exit status {self.proc.poll()}; agent stderr:\n{self.stderr()}")

    def exit_code(self, what: str) -> int:
        """The agent's exit status within TIMEOUT; otherwise the test fails, saying ``what`` it waited for."""
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.fail(what)
            raise

    def recv(self) -> tuple[int, int, bytes]:
        if self.backlog:
            return self.backlog.pop(0)
        try:
            return wire.recv_frame(self.conn)
        except (TimeoutError, wire.FrameError) as exc:
            self.fail(f"no frame from the agent ({exc})")
            raise

    def send_control(self, message: dict[str, Any]) -> None:
        self.conn.sendall(wire.encode_control(message))

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its reply; other frames wait in the backlog, in order."""
        self.next_req += 1
        req = self.next_req
        self.send_control({"op": op, "req": req, **fields})
        skipped: list[tuple[int, int, bytes]] = []
        while True:
            kind, stream, payload = self.recv()
            if kind == wire.CONTROL:
                message = wire.decode_control(payload)
                if message.get("req") == req and message["op"] in ("ok", "error"):
                    self.backlog = skipped + self.backlog
                    return message
            skipped.append((kind, stream, payload))

    def ok(self, op: str, **fields: Any) -> dict[str, Any]:
        reply = self.request(op, **fields)
        if reply["op"] != "ok":
            self.fail(f"{op} failed: {reply}")
        return reply

    def create(self, rootfs: Path, cid: str = "main", **spec: Any) -> None:
        self.ok("create", id=cid, spec={"rootfs": {"path": str(rootfs)}, **spec})

    def send_stdin(self, sid: int, data: bytes) -> None:
        self.conn.sendall(wire.encode(wire.DATA, wire.stream_id(sid, wire.STDIN), data))

    def close_stdin(self, sid: int) -> None:
        self.conn.sendall(wire.encode(wire.EOF, wire.stream_id(sid, wire.STDIN)))

    def next_data(self, sid: int) -> tuple[int, bytes]:
        """The next output of a session; frames of others stay in the backlog."""
        others: list[tuple[int, int, bytes]] = []
        while True:
            kind, stream, payload = self.recv()
            if kind == wire.DATA and wire.split_stream(stream)[0] == sid:
                self.backlog = others + self.backlog
                return wire.split_stream(stream)[1], payload
            others.append((kind, stream, payload))

    def events(self, sid: int) -> list[tuple[Any, ...]]:
        """Frames of one session until its exit: ("data", fd, bytes), ("eof", fd), ("exit", code)."""
        events: list[tuple[Any, ...]] = []
        others: list[tuple[int, int, bytes]] = []
        while True:
            kind, stream, payload = self.recv()
            if kind == wire.CONTROL:
                message = wire.decode_control(payload)
                if message["op"] == "exit" and message["sid"] == sid:
                    events.append(("exit", message["code"]))
                    self.backlog = others + self.backlog
                    return events
                others.append((kind, stream, payload))
                continue
            frame_sid, fd = wire.split_stream(stream)
            if frame_sid != sid:
                others.append((kind, stream, payload))
            elif kind == wire.DATA:
                events.append(("data", fd, payload))
            else:
                events.append(("eof", fd))

    def outcome(self, sid: int) -> tuple[bytes, bytes, int]:
        events = self.events(sid)
        out = b"".join(e[2] for e in events if e[0] == "data" and e[1] == wire.STDOUT)
        err = b"".join(e[2] for e in events if e[0] == "data" and e[1] == wire.STDERR)
        return out, err, events[-1][1]

    def run(self, rootfs: Path, *args: str, **spec: Any) -> tuple[bytes, bytes, int]:
        self.create(rootfs, args=list(args), **spec)
        self.ok("start", id="main")
        return self.outcome(1)

    def close(self) -> int | None:
        self.conn.close()
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            self.server.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Session]:
    session = Session(tmp_path)
    yield session
    session.close()


def test_hello_comes_first(agent: Session) -> None:
    kind, stream, payload = agent.recv()
    assert (kind, stream) == (wire.CONTROL, 0)
    hello = wire.decode_control(payload)
    assert (hello["op"], hello["version"]) == ("hello", wire.VERSION)
    assert hello["uptime"] > 0


def test_output_then_eof_then_exit(agent: Session, rootfs: Path) -> None:
    agent.create(rootfs, args=["echo", "hi"])
    reply = agent.ok("start", id="main")
    assert reply["pid"] > 0
    events = agent.events(1)
    assert ("data", wire.STDOUT, b"hi\n") in events
    assert events[-1] == ("exit", 0)
    assert {("eof", wire.STDOUT), ("eof", wire.STDERR)} <= set(events)
    stdout_eof = events.index(("eof", wire.STDOUT))
    assert events.index(("data", wire.STDOUT, b"hi\n")) < stdout_eof < len(events) - 1


def test_exit_status(agent: Session, rootfs: Path) -> None:
    assert agent.run(rootfs, "sh", "-c", "exit 7")[2] == 7


def test_stderr_has_its_own_stream(agent: Session, rootfs: Path) -> None:
    out, err, code = agent.run(rootfs, "sh", "-c", "echo out; echo err >&2")
    assert (out, err, code) == (b"out\n", b"err\n", 0)


def test_large_output_arrives_whole_before_exit(agent: Session, rootfs: Path) -> None:
    out, _, code = agent.run(rootfs, "sh", "-c", "i=0; while [ $i -lt 20000 ]; do echo line$i; i=$((i+1)); done")
    assert code == 0
    lines = out.decode().splitlines()
    assert len(lines) == 20000 and lines[-1] == "line19999"


def test_missing_command_is_127_with_dockers_message(agent: Session, rootfs: Path) -> None:
    agent.create(rootfs, args=["nosuchcommand"])
    reply = agent.request("start", id="main")
    assert reply["op"] == "error" and reply["code"] == 127
    assert reply["message"] == 'exec: "nosuchcommand": executable file not found in $PATH'


def test_missing_absolute_path_is_127(agent: Session, rootfs: Path) -> None:
    agent.create(rootfs, args=["/bin/nope"])
    reply = agent.request("start", id="main")
    assert (reply["op"], reply["code"]) == ("error", 127)
    assert "no such file or directory" in reply["message"]


def test_non_executable_file_is_126(agent: Session, rootfs: Path) -> None:
    agent.create(rootfs, args=["/bin/notexec"])
    reply = agent.request("start", id="main")
    assert reply == {"op": "error", "req": reply["req"], "code": 126,
                     "message": 'exec: "/bin/notexec": permission denied'}


def test_user_by_name_gets_its_groups_and_home(agent: Session, rootfs: Path) -> None:
    out, err, code = agent.run(rootfs, "sh", "-c", "id; echo HOME=$HOME", user="alice")
    assert code == 0, err
    text = out.decode()
    assert "uid=1000(alice) gid=1000(alice)" in text
    assert "1001(devs)" in text
    assert "HOME=/home/alice" in text


def test_numeric_user_and_group_need_no_entries(agent: Session, rootfs: Path) -> None:
    out, _, code = agent.run(rootfs, "id", "-u", user="4242:4343")
    assert (out, code) == (b"4242\n", 0)


def test_unknown_user_is_a_clear_error(agent: Session, rootfs: Path) -> None:
    agent.create(rootfs, args=["true"], user="mallory")
    reply = agent.request("start", id="main")
    assert reply["op"] == "error" and reply["code"] == 125
    assert reply["message"] == "unable to find user mallory: no matching entries in passwd file"


def test_env_cwd_and_default_path(agent: Session, rootfs: Path) -> None:
    out, _, code = agent.run(rootfs, "sh", "-c",
                             'pwd; echo "$GREETING"; echo "$PATH"; echo "$HOME $HOSTNAME"; hostname',
                             env=["GREETING=hello there"], cwd="/srv/data", hostname="box")
    assert code == 0
    assert out.decode().splitlines() == [
        "/srv/data", "hello there", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "/root box",
        "box",
    ]
    assert socket.gethostname() != "box"


def test_missing_workdir_is_created_like_docker_run(agent: Session, rootfs: Path) -> None:
    out, _, code = agent.run(rootfs, "pwd", cwd="/new/dir")
    assert (out, code) == (b"/new/dir\n", 0)


def test_etc_files_are_written(agent: Session, rootfs: Path) -> None:
    (rootfs / "etc" / "resolv.conf").symlink_to("/run/systemd/resolve/stub-resolv.conf")
    out, _, code = agent.run(rootfs, "cat", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf",
                             hostname="box", hosts="10.0.0.2\tbox\n", resolv_conf="nameserver 10.0.0.1\n")
    assert code == 0
    assert out == b"box\n10.0.0.2\tbox\nnameserver 10.0.0.1\n"


def test_container_sees_its_own_dev_and_proc(agent: Session, rootfs: Path) -> None:
    out, err, code = agent.run(rootfs, "sh", "-c", "ls /dev; readlink /dev/stdout; test -d /proc/self && echo proc")
    assert code == 0, err
    listing = out.decode().split()
    for name in ("null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "fd", "stdin"):
        assert name in listing
    assert "sda" not in listing and "vda" not in listing
    assert "proc" in listing


def test_signal_reaches_the_main_process(agent: Session, rootfs: Path) -> None:
    agent.create(rootfs, args=["sleep", "600"])
    agent.ok("start", id="main")
    agent.ok("signal", id="main", signal=9)  # PID 1 of its namespace: TERM without a handler is ignored, as in docker
    assert agent.events(1)[-1] == ("exit", 137)


def test_a_handled_signal_reaches_the_main_process(agent: Session, rootfs: Path) -> None:
    agent.create(rootfs, args=["sh", "-c", "trap 'exit 42' TERM; echo ready; while :; do sleep 1; done"])
    agent.ok("start", id="main")
    while b"ready" not in agent.recv()[2]:  # bounded by recv's timeout; then the trap is set
        pass
    agent.ok("signal", id="main", signal=15)
    assert agent.events(1)[-1] == ("exit", 42)


def test_signals_to_the_agent_are_forwarded(agent: Session, rootfs: Path) -> None:
    agent.create(rootfs, args=["sh", "-c", 'trap "exit 3" HUP; echo ready; while true; do sleep 0.05; done'])
    agent.ok("start", id="main")
    assert agent.next_data(1) == (wire.STDOUT, b"ready\n")
    agent.proc.send_signal(signal.SIGHUP)
    assert agent.events(1)[-1] == ("exit", 3)


def test_orphans_are_reaped_and_not_reported(tmp_path: Path, rootfs: Path) -> None:
    """Without the runtime (a container in its own pid namespace reparents to its own init), orphans of the
    container come to the agent, which reaps them; the runtime's own children rely on that too."""
    agent = Session(tmp_path, env={"MICROPOD_AGENT_RUNTIME": "0"})
    try:
        _orphans_are_reaped(agent, rootfs)
    finally:
        agent.close()


def test_a_container_sees_only_its_own_processes(agent: Session, rootfs: Path) -> None:
    agent.create(rootfs, args=["sleep", "600"])
    agent.ok("start", id="main")
    agent.ok("exec", id="main", sid=2, spec={"args": ["sh", "-c", "ls /proc | grep -c '^[0-9]'; echo $$"]})
    out, _, code = agent.outcome(2)
    assert code == 0
    count, pid = out.split()
    assert int(pid) < 10 and int(count) <= 4, out  # sleep (1), sh, ls, grep: not the agent nor the host
    agent.ok("signal", id="main", signal="SIGKILL")
    assert agent.events(1)[-1] == ("exit", 137)


def _orphans_are_reaped(agent: Session, rootfs: Path) -> None:
    agent.create(rootfs, args=["sleep", "600"])
    agent.ok("start", id="main")
    agent.ok("exec", id="main", sid=2, spec={"args": ["sh", "-c", "sleep 1 & echo $!"]})
    out, _, code = agent.outcome(2)
    assert code == 0
    orphan = int(out)
    deadline = time.monotonic() + TIMEOUT
    reparented = False
    while True:
        try:
            stat = Path(f"/proc/{orphan}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):  # the second when it goes while /proc is read
            break  # exited and reaped
        reparented = reparented or int(stat[1]) == agent.proc.pid
        assert time.monotonic() < deadline, f"orphan {orphan} not reaped, state {stat[0]}\n{agent.stderr()}"
        time.sleep(0.02)  # polling a condition, bounded by the deadline
    assert reparented, "the orphan never became the agent's child (subreaper not set?)"
    agent.ok("signal", id="main", signal="SIGKILL")
    assert agent.events(1)[-1] == ("exit", 137)


def test_stdin_is_streamed(agent: Session, rootfs: Path) -> None:
    agent.create(rootfs, args=["cat"], stdin=True)
    agent.ok("start", id="main")
    agent.send_stdin(1, b"first\n")
    agent.send_stdin(1, b"second\n")
    agent.close_stdin(1)
    out, _, code = agent.outcome(1)
    assert (out, code) == (b"first\nsecond\n", 0)


def test_stdin_is_dev_null_unless_asked(agent: Session, rootfs: Path) -> None:
    out, _, code = agent.run(rootfs, "cat")
    assert (out, code) == (b"", 0)


def test_concurrent_execs(agent: Session, rootfs: Path) -> None:
    agent.create(rootfs, args=["sleep", "600"], env=["FROM_CONTAINER=yes"], user="alice")
    agent.ok("start", id="main")
    agent.ok("exec", id="main", sid=2, spec={"args": ["cat"], "stdin": True})
    agent.ok("exec", id="main", sid=3, spec={"args": ["sh", "-c", "id -u; echo $FROM_CONTAINER $EXTRA"],
                                             "env": ["EXTRA=x"]})
    assert agent.outcome(3) == (b"1000\nyes x\n", b"", 0)
    agent.send_stdin(2, b"still here\n")
    agent.close_stdin(2)
    assert agent.outcome(2) == (b"still here\n", b"", 0)
    reply = agent.request("exec", id="main", sid=4, spec={"args": ["missing"]})
    assert (reply["op"], reply["code"]) == ("error", 127)
    agent.ok("signal", id="main", signal=9)
    assert agent.events(1)[-1] == ("exit", 137)


def test_exec_needs_a_running_container(agent: Session, rootfs: Path) -> None:
    agent.run(rootfs, "true")
    reply = agent.request("exec", id="main", sid=2, spec={"args": ["true"]})
    assert reply["op"] == "error" and "not running" in reply["message"]


def test_tty_exec_gets_a_terminal(agent: Session, rootfs: Path) -> None:
    agent.create(rootfs, args=["sleep", "600"])
    agent.ok("start", id="main")
    agent.ok("exec", id="main", sid=2, spec={"args": ["sh", "-c", "tty; test -t 0 && echo isatty; echo $TERM"],
                                             "tty": True, "rows": 40, "cols": 100})
    events = agent.events(2)
    assert events[-1] == ("exit", 0)
    out = b"".join(e[2] for e in events if e[0] == "data").decode()
    assert all(e[1] == wire.STDOUT for e in events if e[0] in ("data", "eof"))
    assert out.splitlines() == ["/dev/pts/0", "isatty", "xterm"]


def test_tty_resize_and_input(agent: Session, rootfs: Path) -> None:
    agent.create(rootfs, args=["sh", "-c", "read line; stty size; echo got $line"], tty=True, stdin=True)
    agent.ok("start", id="main")
    agent.ok("resize", sid=1, rows=33, cols=77)
    agent.send_stdin(1, b"hello\n")
    out, _, code = agent.outcome(1)
    assert code == 0
    assert "33 77" in out.decode() and "got hello" in out.decode()


def test_bad_requests_get_error_replies(agent: Session, rootfs: Path) -> None:
    assert agent.request("bogus")["op"] == "error"
    assert agent.request("start", id="nope")["message"] == "no such container: nope"
    assert agent.request("create", id="../evil", spec={})["op"] == "error"
    agent.create(rootfs, args=["true"])
    assert "already exists" in agent.request("create", id="main", spec={"rootfs": {"path": str(rootfs)}})["message"]
    assert agent.request("signal", id="main", signal="SIGNOPE")["op"] == "error"
    # the agent is still fine
    agent.ok("start", id="main")
    assert agent.events(1)[-1] == ("exit", 0)


def test_shutdown_unmounts_and_exits(agent: Session, rootfs: Path) -> None:
    agent.create(rootfs, args=["sleep", "600"])
    reply = agent.ok("start", id="main")
    mountinfo = Path(f"/proc/{agent.proc.pid}/mountinfo")
    assert f"{rootfs}/proc" in mountinfo.read_text()
    assert "errors" not in agent.ok("shutdown")
    assert agent.exit_code("the agent did not exit after shutdown") == 0
    assert not Path(f"/proc/{reply['pid']}").exists()


def test_main_exit_without_shutdown_ends_the_agent(tmp_path: Path, rootfs: Path) -> None:
    session = Session(tmp_path, env={"MICROPOD_AGENT_GRACE": "0.2"})
    try:
        session.run(rootfs, "true")
        assert session.exit_code("the agent waited forever for shutdown") == 0
    finally:
        session.close()


def test_agent_imports_only_what_it_needs() -> None:
    code = BOOTSTRAP.replace("main()", "print(' '.join(sorted(sys.modules)))")
    modules = set(subprocess.run([PYTHON, "-I", "-S", "-c", code], check=True, capture_output=True,
                                 text=True, timeout=TIMEOUT).stdout.split())
    heavy = {"json", "re", "enum", "typing", "socket", "signal", "selectors", "subprocess", "asyncio", "logging",
             "dataclasses", "inspect", "contextlib", "pathlib"}
    assert not modules & heavy
    guest_modules = ("micropod.agent", "micropod.sys", "micropod.netlink", "micropod.wire")
    assert not {m for m in modules if m.startswith("micropod") and not m.startswith(guest_modules)} - {"micropod"}


def _losetup(image: Path, read_only: bool) -> str:
    argv = ["losetup", "--find", "--show", *(["--read-only"] if read_only else []), str(image)]
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=TIMEOUT).stdout.strip()


@pytest.mark.skipif(not (shutil.which("gensquashfs") and shutil.which("mkfs.ext4") and shutil.which("losetup")),
                    reason="needs squashfs-tools-ng, e2fsprogs and losetup")
def test_overlay_from_disks_and_a_clean_upper_after_shutdown(tmp_path: Path, rootfs: Path) -> None:
    """The VM path: squashfs lower + ext4 upper joined by overlayfs, here on loop devices."""
    lower_image, upper_image = tmp_path / "lower.sqfs", tmp_path / "upper.ext4"
    subprocess.run(["gensquashfs", "--pack-dir", str(rootfs), str(lower_image)], check=True,
                   capture_output=True, timeout=60)
    with open(upper_image, "wb") as file:
        file.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(upper_image)], check=True, capture_output=True, timeout=60)
    devices = []
    try:
        devices.append(_losetup(lower_image, read_only=True))
        devices.append(_losetup(upper_image, read_only=False))
        session = Session(tmp_path, env={"MICROPOD_AGENT_MOUNT_BASE": str(tmp_path / "mnt")})
        try:
            session.ok("create", id="main", spec={"args": ["sh", "-c", "echo kept > /written; cat /etc/hostname"],
                                                 "hostname": "vm1",
                                                 "rootfs": {"lower": devices[0], "upper": devices[1]}})
            session.ok("start", id="main")
            assert session.outcome(1) == (b"vm1\n", b"", 0)
            assert session.ok("shutdown") == {"op": "ok", "req": session.next_req}  # no unmount errors
            assert session.proc.wait(TIMEOUT) == 0
        finally:
            session.close()
        fsck = subprocess.run(["e2fsck", "-n", "-f", devices[1]], capture_output=True, text=True, timeout=60)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        listing = subprocess.run(["debugfs", "-R", "cat /upper/written", devices[1]], capture_output=True,
                                 text=True, timeout=60)
        assert listing.stdout == "kept\n"
    finally:
        for device in devices:
            subprocess.run(["losetup", "--detach", device], check=False, timeout=TIMEOUT)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_as_pid_one(tmp_path: Path, rootfs: Path) -> None:
    """In its own PID namespace the agent is init, as in the VM: orphans come to it, kill(-1) is safe. (Chroot
    mode: through the runtime, a container's orphans stay in its own pid namespace.)"""
    session = Session(tmp_path, env={"MICROPOD_AGENT_RUNTIME": "0"},
                      wrapper=("unshare", "--pid", "--fork", "--mount-proc", "--kill-child"))
    try:
        session.create(rootfs, args=["sleep", "600"])
        assert session.ok("start", id="main")["pid"] == 2
        # An orphan in a session of its own: only kill(-1) at shutdown finds it.
        session.ok("exec", id="main", sid=2, spec={"args": ["sh", "-c", "setsid sleep 600 & echo $!"]})
        assert session.outcome(2)[2] == 0
        started = time.monotonic()
        assert "errors" not in session.ok("shutdown"), "something still held the container's mounts"
        assert time.monotonic() - started < 4.0, "the orphan survived until the kill deadline"
        assert session.events(1)[-1] == ("exit", 137)
        assert session.exit_code("the agent did not exit after shutdown") == 0
    finally:
        session.close()


def test_dev_log_messages_go_to_the_host(agent: Session, rootfs: Path) -> None:
    out, err, code = agent.run(rootfs, "sh", "-c", "logger -t app hello-syslog && test -S /dev/log && echo sock")
    assert (out, code) == (b"sock\n", 0), err
    messages: list[dict[str, Any]] = []
    while not messages:  # before or after the exit report, depending on which the agent saw first
        kind, _, payload = agent.recv()
        if kind == wire.CONTROL:
            message = wire.decode_control(payload)
            if message["op"] == "syslog":
                messages.append(message)
    assert messages[0]["id"] == "main"
    assert "app" in messages[0]["message"] and messages[0]["message"].endswith("hello-syslog")
    assert agent.ok("shutdown").get("errors") is None  # /dev unmounts although the socket was bound there


def test_stats_reports_the_counters(agent: Session) -> None:
    reply = agent.ok("stats")
    assert reply["cpu_total"] >= reply["cpu_idle"] > 0 and reply["cpus"] >= 1
    assert reply["mem_total"] > reply["mem_used"] > 0
    assert reply["block_read"] >= 0 and reply["block_write"] >= 0 and reply["pids"] >= 0
    assert reply["net_rx"] >= 0 and reply["net_tx"] >= 0


def test_a_fifo_as_the_images_passwd_cannot_block_the_agent(agent: Session, rootfs: Path) -> None:
    """The agent (PID 1) reads the image's /etc/passwd: a fifo there would block it on open."""
    (rootfs / "etc" / "passwd").unlink()
    os.mkfifo(rootfs / "etc" / "passwd")
    agent.create(rootfs, args=["true"], user="alice")
    reply = agent.request("start", id="main")  # bounded by the session's timeout: a blocked agent fails here
    assert reply["op"] == "error" and "alice" in reply["message"], reply


def test_the_images_etc_hosts_cannot_lead_the_agent_onto_its_own_mounts(agent: Session, rootfs: Path) -> None:
    """/etc/hosts as a link to /dev/full: resolved inside the root, that is the agent's own /dev there."""
    (rootfs / "etc" / "hosts").symlink_to("/dev/full")
    agent.create(rootfs, args=["cat", "/etc/hosts"])
    agent.ok("start", id="main")
    out, _, code = agent.outcome(1)
    assert code == 0 and b"localhost" in out
    assert (rootfs / "etc" / "hosts").is_file() and not (rootfs / "etc" / "hosts").is_symlink()
