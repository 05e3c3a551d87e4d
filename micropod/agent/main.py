"""micropod's guest agent: PID 1 inside the VM.

Boot mounts, then one channel to the host, ``hello``, and a single-threaded epoll loop over the
channel, the container processes' stdio and a signal wakeup pipe. The host drives it with the ops
of protocol.py (create, start, exec, signal, resize, shutdown); the agent streams stdio as DATA and
EOF frames and reports each exit after its last output. It reaps every zombie, forwards the signals
it receives to the containers' main processes, and powers the VM off at the end.

Settings come from the environment, which the kernel fills from unknown ``KEY=value`` words on its
command line: MICROPOD_AGENT_CHANNEL (auto | serial | vsock | unix:PATH, the last being test mode),
MICROPOD_AGENT_REBOOT (restart | poweroff | halt), MICROPOD_AGENT_GRACE (seconds to wait for
``shutdown`` after the last main process exits), MICROPOD_AGENT_MOUNT_BASE (where the first
container's disks are mounted; the guest image provides /mnt/lower, /mnt/upper and /mnt/root).

Standard library only, and few imports: this runs as ``python3.11 -I -S`` on every VM boot.
"""

from __future__ import annotations

import _socket
import errno
import os
import select
import sys
import time

from micropod import syscalls
from micropod.agent import archive, mounts, netconf, process, protocol
from micropod.agent import channel as channels

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal  # the same functions and numbers, with stubs
    from collections.abc import Callable
    from typing import Any
else:
    import _signal  # signal.py itself would import enum

# The same values as micropod.vmm.base, which the agent cannot import (dataclasses, pathlib).
AGENT_SERIAL_NAME = "micropod.agent"
AGENT_VSOCK_PORT = 1024

FORWARDED_SIGNALS = (
    _signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP, _signal.SIGQUIT, _signal.SIGUSR1, _signal.SIGUSR2,
)
REBOOT_COMMANDS = {
    "restart": syscalls.LINUX_REBOOT_CMD_RESTART,
    "poweroff": syscalls.LINUX_REBOOT_CMD_POWER_OFF,
    "halt": syscalls.LINUX_REBOOT_CMD_HALT,
}
_READ_SIZE = 1 << 16
_DRAIN_LIMIT = 16 << 20  # a grandchild still writing must not keep an exit report back forever
_KILL_WAIT = 5.0


class RequestError(Exception):
    def __init__(self, message: str, code: int = 125) -> None:
        super().__init__(message)
        self.code = code


class Config:
    __slots__ = ("channel", "grace", "mount_base", "reboot", "test_mode")

    def __init__(self, env: dict[str, str]) -> None:
        self.channel = env.get("MICROPOD_AGENT_CHANNEL", "auto")
        self.test_mode = self.channel.startswith("unix:")
        self.mount_base = env.get("MICROPOD_AGENT_MOUNT_BASE", "/mnt")
        self.reboot = REBOOT_COMMANDS.get(env.get("MICROPOD_AGENT_REBOOT", "restart"),
                                          syscalls.LINUX_REBOOT_CMD_RESTART)
        try:
            self.grace = float(env.get("MICROPOD_AGENT_GRACE", "10"))
        except ValueError:
            self.grace = 10.0


class Container:
    __slots__ = ("cid", "main", "main_done", "mounted", "root", "spec")

    def __init__(self, cid: str, spec: dict[str, Any], root: str, mounted: list[str]) -> None:
        self.cid = cid
        self.spec = spec
        self.root = root
        self.mounted = mounted
        self.main: Proc | None = None
        self.main_done = False


class Proc:
    """A process the host started, from fork until its exit has been reported."""

    __slots__ = ("container", "is_main", "master", "outputs", "pid", "sid", "stdin", "stdin_eof",
                 "stdin_pending")

    def __init__(self, container: Container, sid: int, child: process.Child, is_main: bool) -> None:
        self.container = container
        self.sid = sid
        self.pid = child.pid
        self.is_main = is_main
        self.master = child.master
        self.stdin = child.stdin
        self.stdin_pending = bytearray()
        self.stdin_eof = False
        self.outputs = {child.stdout: protocol.stream_id(sid, protocol.STDOUT)}
        if child.stderr is not None:
            self.outputs[child.stderr] = protocol.stream_id(sid, protocol.STDERR)


def console(message: str) -> None:
    """The VMM logs the console, so the host can show its tail when the agent cannot talk."""
    _write_quietly(2, f"micropod-agent: {message}\n".encode(errors="replace"))


def _write_quietly(fd: int, data: bytes) -> bool:
    try:
        os.write(fd, data)
    except OSError:
        return False
    return True


def _ignore_signal(signum: int, frame: object) -> None:
    """The C-level handler has already written the signal number to the wakeup pipe."""


class Agent:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.poller = select.epoll()
        self.interest: dict[int, int] = {}
        self.channel: channels.Channel | None = None
        self.listener: channels.VsockListener | None = None
        self.idle_serial: channels.Channel | None = None
        self.containers: dict[str, Container] = {}
        self.procs: dict[int, Proc] = {}
        self.fd_procs: dict[int, Proc] = {}
        self.syslogs: dict[int, tuple[Container, _socket.socket]] = {}
        self.uploads: dict[int, tuple[Container, str, str | None, bytearray]] = {}
        self.shutdown_at: float | None = None
        self.reattach_at: float | None = None
        self.loss_reported = False
        self.running = True
        self.handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "create": self.on_create,
            "start": self.on_start,
            "exec": self.on_exec,
            "signal": self.on_signal,
            "resize": self.on_resize,
            "shutdown": self.on_shutdown,
            "restore": self.on_restore,
            "network": self.on_network,
            "stats": self.on_stats,
            "archive-get": self.on_archive_get,
            "archive-put": self.on_archive_put,
        }
        self.wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_r, False)
        os.set_blocking(wakeup_w, False)
        _signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
        for signum in (_signal.SIGCHLD, *FORWARDED_SIGNALS):
            _signal.signal(signum, _ignore_signal)
        self.watch(self.wakeup_r, select.EPOLLIN)

    # --- plumbing -------------------------------------------------------------------------------

    def watch(self, fd: int, events: int) -> None:
        """Set the epoll interest of ``fd``; 0 removes it."""
        current = self.interest.get(fd)
        if events == 0:
            if current is not None:
                self.poller.unregister(fd)
                del self.interest[fd]
        elif current is None:
            self.poller.register(fd, events)
            self.interest[fd] = events
        elif current != events:
            self.poller.modify(fd, events)
            self.interest[fd] = events

    def send(self, frame: bytes) -> None:
        if self.channel is None:
            return
        try:
            self.channel.send(frame)
        except channels.ChannelLost as exc:
            self.channel_lost(str(exc))

    def send_control(self, message: dict[str, Any]) -> None:
        self.send(protocol.encode_control(message))

    def log(self, message: str) -> None:
        console(message)
        self.send_control({"op": "log", "message": message})

    def attach(self, channel: channels.Channel) -> None:
        """Greet a newly connected host; hello is always its first frame."""
        self.channel = channel
        self.watch(channel.fd, select.EPOLLIN)
        try:
            # Unbounded: a virtio-serial port is writable only once the host side has connected.
            hello = {"op": "hello", "version": protocol.VERSION, "uptime": time.clock_gettime(time.CLOCK_BOOTTIME)}
            channel.send(protocol.encode_control(hello), stall_timeout=None)
        except channels.ChannelLost as exc:
            self.channel_lost(str(exc))

    def channel_lost(self, reason: str) -> None:
        """Output is dropped from here on; the loop shuts down in test mode or waits for the host."""
        channel, self.channel = self.channel, None
        if channel is None:
            return
        if not self.loss_reported:
            # The serial port keeps reading as EOF while no host is connected: say it once.
            console(f"channel to the host lost: {reason}")
            self.loss_reported = True
        self.watch(channel.fd, 0)
        if channel.kind == "serial":
            # The port stays ours; it reads as EOF until the host side is connected again.
            self.idle_serial = channel
            self.reattach_at = time.monotonic() + 1.0
        else:
            channel.close()

    # --- the loop -------------------------------------------------------------------------------

    def run(self) -> int:
        while self.running:
            events = self.poller.poll(self.next_timeout())
            for fd, mask in events:
                try:
                    self.on_event(fd, mask)
                except Exception as exc:
                    self.log(f"internal error on fd {fd}: {type(exc).__name__}: {exc}")
            try:
                self.on_timers()
            except Exception as exc:
                self.log(f"internal error in timers: {type(exc).__name__}: {exc}")
            if self.config.test_mode and self.channel is None:
                self.shutdown()  # a test that hangs up leaves nothing behind
                self.running = False
        return 0

    def next_timeout(self) -> float:
        deadlines = [t for t in (self.shutdown_at, self.reattach_at) if t is not None]
        if not deadlines:
            return -1
        return max(0.0, min(deadlines) - time.monotonic())

    def on_timers(self) -> None:
        now = time.monotonic()
        if self.reattach_at is not None and now >= self.reattach_at and self.idle_serial is not None:
            self.reattach_at = None
            self.channel, self.idle_serial = self.idle_serial, None
            self.watch(self.channel.fd, select.EPOLLIN)
        if self.shutdown_at is not None and now >= self.shutdown_at:
            self.log("no shutdown from the host after the container exited; powering off")
            self.shutdown()
            self.end()

    def on_event(self, fd: int, mask: int) -> None:
        if fd == self.wakeup_r:
            self.on_signals()
        elif self.channel is not None and fd == self.channel.fd:
            self.on_channel_readable()
        elif self.listener is not None and fd == self.listener.fd:
            if self.channel is None:
                self.attach(self.listener.accept())
            else:
                self.listener.accept().close()  # one host at a time
        elif fd in self.syslogs:
            self.on_syslog(fd)
        elif fd in self.fd_procs:
            proc = self.fd_procs[fd]
            if fd == proc.stdin and mask & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
                self.flush_stdin(proc)
            if fd in proc.outputs and mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                self.pump(proc, fd, drain=False)

    def on_signals(self) -> None:
        signals: set[int] = set()
        while True:
            try:
                data = os.read(self.wakeup_r, 512)
            except BlockingIOError:
                break
            if not data:
                break
            signals.update(data)
        if _signal.SIGCHLD in signals:
            self.reap()
        for signum in sorted(signals - {_signal.SIGCHLD}):
            self.forward_signal(signum)

    def forward_signal(self, signum: int) -> None:
        targets = [c.main for c in self.containers.values() if c.main is not None and not c.main_done]
        if not targets:
            console(f"signal {signum} received with no container running; ignored")
        for proc in targets:
            _send_signal(proc.pid, signum)

    # --- requests -------------------------------------------------------------------------------

    def on_channel_readable(self) -> None:
        assert self.channel is not None
        data = self.channel.read()
        if data is None:
            return
        if not data:
            self.channel_lost("the host closed it")
            return
        try:
            frames = self.channel.reader.feed(data)
        except protocol.FrameError as exc:
            self.channel_lost(str(exc))
            return
        for kind, stream, payload in frames:
            if kind == protocol.CONTROL:
                try:
                    message = protocol.decode_control(payload)
                except protocol.FrameError as exc:
                    self.log(f"ignored a control frame: {exc}")
                    continue
                self.on_request(message)
            else:
                self.on_stdin(kind, stream, payload)

    def on_request(self, message: dict[str, Any]) -> None:
        self.loss_reported = False
        op, req = message["op"], message.get("req")
        power_off = False
        try:
            handler = self.handlers.get(op)
            if handler is None:
                raise RequestError(f"unknown op {op!r}")
            result = handler(message)
            power_off = op == "shutdown"
        except (RequestError, process.LaunchError) as exc:
            self.reply_error(req, op, str(exc), exc.code)
        except Exception as exc:  # the host must get an answer whatever went wrong
            self.reply_error(req, op, _describe(exc), 125)
        else:
            self.send_control({"op": "ok", "req": req, **result})
        if power_off:
            self.end()

    def on_restore(self, message: dict[str, Any]) -> dict[str, Any]:
        """First request after the VM was resumed from a snapshot: make it this VM, not the template."""
        seed = bytes.fromhex(str(message.get("entropy", "")))
        if len(seed) < 32:
            raise RequestError("restore needs at least 32 bytes of entropy")
        if not self.config.test_mode:
            syscalls.add_entropy(seed)
            time.clock_settime(time.CLOCK_REALTIME, float(message["time"]))
        return {"uptime": time.clock_gettime(time.CLOCK_BOOTTIME)}

    def on_network(self, message: dict[str, Any]) -> dict[str, Any]:
        """Address the VM's NICs with what the host leased (a restored VM kept the template's view)."""
        interfaces = message.get("interfaces")
        if not isinstance(interfaces, list):
            raise RequestError("network needs a list of interfaces")
        for interface in interfaces:
            try:
                netconf.configure_from(interface)
            except (KeyError, ValueError, OSError, netconf.NetconfError) as exc:
                raise RequestError(f"network: {_describe(exc)}") from None
        return {}

    def reply_error(self, req: object, op: str, message: str, code: int) -> None:
        console(f"{op} failed: {message}")
        self.send_control({"op": "error", "req": req, "message": message, "code": code})

    def container(self, message: dict[str, Any]) -> Container:
        cid = message.get("id")
        if not isinstance(cid, str) or cid not in self.containers:
            raise RequestError(f"no such container: {cid}")
        return self.containers[cid]

    def on_create(self, message: dict[str, Any]) -> dict[str, Any]:
        cid, spec = message.get("id"), message.get("spec")
        if not isinstance(cid, str) or not _valid_id(cid):
            raise RequestError(f"invalid container id {cid!r}")
        if cid in self.containers:
            raise RequestError(f"container {cid} already exists")
        if not isinstance(spec, dict):
            raise RequestError("create needs a spec object")
        # The first container uses the mount points the guest image provides; a pod's others go to /run.
        dirs = mounts.RootfsDirs(self.config.mount_base if not self.containers else f"/run/micropod-{cid}")
        root, plan = mounts.rootfs_plan(spec.get("rootfs") or {}, dirs)
        plan += mounts.container_plan(root)
        mounted: list[str] = []
        try:
            mounts.apply(plan, mounted)
            if spec.get("hostname"):
                _socket.sethostname(spec["hostname"])
        except BaseException:
            mounts.unmount_all(mounted)
            raise
        container = Container(cid, spec, root, mounted)
        self.containers[cid] = container
        self.serve_syslog(container)
        return {}

    def serve_syslog(self, container: Container) -> None:
        """The container's /dev/log: a datagram socket whose messages go to the host (op ``syslog``)."""
        path = f"{container.root}/dev/log"
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
        try:
            if os.path.lexists(path):
                os.unlink(path)
            sock.bind(path)
            os.chmod(path, 0o666)
        except OSError as exc:
            sock.close()
            self.log(f"cannot serve /dev/log in container {container.cid}: {exc}")
            return
        sock.setblocking(False)
        self.syslogs[sock.fileno()] = (container, sock)
        self.watch(sock.fileno(), select.EPOLLIN)

    def on_syslog(self, fd: int) -> None:
        container, sock = self.syslogs[fd]
        for _ in range(64):  # a bounded batch per wakeup; the rest waits for the next one
            try:
                data = sock.recv(_READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                self.log(f"reading /dev/log of container {container.cid}: {exc}")
                return
            self.send_control({"op": "syslog", "id": container.cid, "message": data.decode(errors="replace")})

    def close_syslogs(self) -> None:
        for fd, (_, sock) in list(self.syslogs.items()):
            self.on_syslog(fd)  # what was logged before the end still goes out
            self.watch(fd, 0)
            sock.close()
        self.syslogs.clear()

    def on_start(self, message: dict[str, Any]) -> dict[str, Any]:
        container = self.container(message)
        if container.main is not None:
            raise RequestError(f"container {container.cid} has already been started")
        sid = int(message.get("sid", container.spec.get("sid", 1)))
        self.check_sid_free(sid)
        child = process.spawn(process.Launch(container.root, container.spec, is_exec=False))
        container.main = self.track(container, sid, child, is_main=True)
        return {"pid": child.pid}

    def on_exec(self, message: dict[str, Any]) -> dict[str, Any]:
        container = self.container(message)
        if container.main is None or container.main_done:
            raise RequestError(f"container {container.cid} is not running")
        sid = int(message["sid"])
        self.check_sid_free(sid)
        spec = message.get("spec") or {}
        base = container.spec
        # docker exec: the container's env, user and working directory unless the exec overrides them.
        merged = {
            **spec,
            "env": list(base.get("env") or []) + list(spec.get("env") or []),
            "user": spec.get("user") or base.get("user") or "",
            "cwd": spec.get("cwd") or base.get("cwd") or "/",
            "hostname": base.get("hostname") or "",
        }
        child = process.spawn(process.Launch(container.root, merged, is_exec=True))
        self.track(container, sid, child, is_main=False)
        return {"pid": child.pid}

    def on_signal(self, message: dict[str, Any]) -> dict[str, Any]:
        container = self.container(message)
        signum = _signal_number(message.get("signal"))
        if "sid" in message:
            target = self.proc_by_sid(int(message["sid"]))
        else:
            target = None if container.main_done else container.main
        if target is None or target.container is not container:
            raise RequestError(f"container {container.cid} is not running")
        os.kill(target.pid, signum)
        return {}

    def on_resize(self, message: dict[str, Any]) -> dict[str, Any]:
        proc = self.proc_by_sid(int(message["sid"]))
        if proc is None or proc.master is None:
            raise RequestError(f"session {message['sid']} has no terminal")
        syscalls.set_window_size(proc.master, int(message["rows"]), int(message["cols"]))
        return {}

    def on_stats(self, message: dict[str, Any]) -> dict[str, Any]:
        """The guest's counters, read as `docker stats` needs them; the host turns two samples into rates."""
        return guest_stats()

    def on_archive_get(self, message: dict[str, Any]) -> dict[str, Any]:
        """`cp` out: a tar of the path as DATA on the session's stdout, then EOF and an exit report."""
        container = self.container(message)
        sid = int(message["sid"])
        self.check_sid_free(sid)
        stream = protocol.stream_id(sid, protocol.STDOUT)
        out = archive.FrameWriter(lambda data: self.send(protocol.encode(protocol.DATA, stream, data)))
        try:
            archive.write_tar(container.root, str(message["path"]), out)
        except (archive.ArchiveError, OSError) as exc:
            raise RequestError(str(exc), 1) from None
        self.send(protocol.encode(protocol.EOF, stream))
        self.send_control({"op": "exit", "id": container.cid, "sid": sid, "code": 0})
        return {"size": out.written}

    def on_archive_put(self, message: dict[str, Any]) -> dict[str, Any]:
        """`cp` in: the tar comes as the session's stdin; it is unpacked at its EOF."""
        container = self.container(message)
        sid = int(message["sid"])
        self.check_sid_free(sid)
        if sid in self.uploads:
            raise RequestError(f"session {sid} is in use")
        path = str(message["path"])
        try:
            real = archive.resolve(container.root, path)
        except archive.ArchiveError as exc:
            raise RequestError(str(exc), 1) from None
        if os.path.isdir(real):
            dest, rename = path, None
        else:
            parent = path.rstrip("/").rsplit("/", 1)[0] or "/"
            if path.endswith("/") or not os.path.isdir(archive.resolve(container.root, parent)):
                raise RequestError(f"Could not find the file {path} in container", 1)
            dest, rename = parent, path.rstrip("/").rsplit("/", 1)[-1]
        self.uploads[sid] = (container, dest, rename, bytearray())
        return {}

    def on_upload(self, sid: int, kind: int, payload: bytes) -> None:
        container, dest, rename, data = self.uploads[sid]
        if kind != protocol.EOF:
            data += payload
            return
        del self.uploads[sid]
        import io

        code, error = 0, None
        try:
            archive.extract_tar(container.root, dest, io.BytesIO(bytes(data)), rename)
        except Exception as exc:  # tarfile's own errors too: the user hears what went wrong
            code, error = 1, _describe(exc)
        report: dict[str, Any] = {"op": "exit", "id": container.cid, "sid": sid, "code": code}
        if error:
            report["message"] = error
        self.send_control(report)

    def on_shutdown(self, message: dict[str, Any]) -> dict[str, Any]:
        errors = self.shutdown()
        return {"errors": errors} if errors else {}

    # --- processes ------------------------------------------------------------------------------

    def check_sid_free(self, sid: int) -> None:
        if sid < 1:
            raise RequestError(f"invalid session id {sid}")
        if self.proc_by_sid(sid) is not None:
            raise RequestError(f"session {sid} is in use")

    def proc_by_sid(self, sid: int) -> Proc | None:
        for proc in self.procs.values():
            if proc.sid == sid:
                return proc
        return None

    def track(self, container: Container, sid: int, child: process.Child, is_main: bool) -> Proc:
        proc = Proc(container, sid, child, is_main)
        self.procs[proc.pid] = proc
        for fd in proc.outputs:
            self.fd_procs[fd] = proc
            self.watch(fd, select.EPOLLIN)
        if proc.stdin is not None:
            self.fd_procs[proc.stdin] = proc
        return proc

    def on_stdin(self, kind: int, stream: int, payload: bytes) -> None:
        sid, fd = protocol.split_stream(stream)
        if fd == protocol.STDIN and sid in self.uploads:
            self.on_upload(sid, kind, payload)
            return
        proc = self.proc_by_sid(sid)
        if fd != protocol.STDIN or proc is None or proc.stdin is None or proc.stdin_eof:
            return  # input for a process that has gone, or never asked for stdin
        if kind == protocol.EOF:
            proc.stdin_eof = True
        else:
            proc.stdin_pending += payload
        self.flush_stdin(proc)

    def flush_stdin(self, proc: Proc) -> None:
        fd = proc.stdin
        if fd is None:
            return
        while proc.stdin_pending:
            try:
                written = os.write(fd, proc.stdin_pending)
            except BlockingIOError:
                break
            except OSError:  # the process closed its stdin; what it did not read is dropped
                proc.stdin_pending.clear()
                self.close_stdin(proc, send_eot=False)
                return
            del proc.stdin_pending[:written]
        if proc.stdin_pending:
            self.watch(fd, self.interest.get(fd, 0) | select.EPOLLOUT)
        elif proc.stdin_eof:
            self.close_stdin(proc, send_eot=True)
        else:
            self.watch(fd, self.interest.get(fd, 0) & ~select.EPOLLOUT)

    def close_stdin(self, proc: Proc, send_eot: bool) -> None:
        fd, proc.stdin = proc.stdin, None
        if fd is None:
            return
        if fd != proc.master:
            self.watch(fd, 0)
            self.fd_procs.pop(fd, None)
            os.close(fd)
            return
        self.watch(fd, self.interest.get(fd, 0) & ~select.EPOLLOUT)
        if send_eot:
            # A terminal has no half-close; end-of-file is the EOF character at the start of a line.
            _write_quietly(fd, b"\x04")

    def pump(self, proc: Proc, fd: int, drain: bool) -> None:
        """Forward output; one read per wakeup, or everything there is when the process has exited."""
        forwarded = 0
        while True:
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.EIO:  # EIO: the terminal's last holder has closed it
                    self.log(f"reading output of session {proc.sid}: {exc}")
                data = b""
            if not data:
                self.close_output(proc, fd)
                return
            self.send(protocol.encode(protocol.DATA, proc.outputs[fd], data))
            forwarded += len(data)
            if not drain or forwarded >= _DRAIN_LIMIT:
                return

    def close_output(self, proc: Proc, fd: int) -> None:
        stream = proc.outputs.pop(fd)
        if fd == proc.master:
            # Nobody holds the terminal any more: input cannot be delivered either. finish() closes it.
            proc.stdin_pending.clear()
            proc.stdin = None
            self.watch(fd, 0)
        else:
            self.watch(fd, 0)
            self.fd_procs.pop(fd, None)
            os.close(fd)
        self.send(protocol.encode(protocol.EOF, stream))

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.procs.pop(pid, None)
            if proc is not None:  # orphans of the container are only reaped
                self.finish(proc, os.waitstatus_to_exitcode(status))

    def finish(self, proc: Proc, exit_code: int) -> None:
        for fd in self.syslogs:  # messages the process logged come before its exit report
            self.on_syslog(fd)
        for fd in list(proc.outputs):
            self.pump(proc, fd, drain=True)
            if fd in proc.outputs:
                self.close_output(proc, fd)
        proc.stdin_pending.clear()
        self.close_stdin(proc, send_eot=False)
        if proc.master is not None:
            self.watch(proc.master, 0)
            self.fd_procs.pop(proc.master, None)
            os.close(proc.master)
        code = 128 - exit_code if exit_code < 0 else exit_code
        container = proc.container
        self.send_control({"op": "exit", "id": container.cid, "sid": proc.sid, "code": code})
        if proc.is_main:
            container.main_done = True
            # Like the end of a PID namespace: the container's other processes go with its main one.
            for other in self.procs.values():
                if other.container is container:
                    _kill_group(other.pid, _signal.SIGKILL)
            _kill_group(proc.pid, _signal.SIGKILL)
            if all(c.main_done for c in self.containers.values()):
                self.shutdown_at = time.monotonic() + self.config.grace

    # --- the end --------------------------------------------------------------------------------

    def shutdown(self) -> list[str]:
        """Stop every process, report their exits, and unmount the containers' filesystems."""
        self.shutdown_at = None
        self.kill_everything()
        self.close_syslogs()  # a bound socket keeps the container's /dev busy
        os.sync()
        errors: list[str] = []
        for container in reversed(list(self.containers.values())):
            errors += mounts.unmount_all(container.mounted)
        for error in errors:
            self.log(f"shutdown: {error}")
        return errors

    def kill_everything(self) -> None:
        deadline = time.monotonic() + _KILL_WAIT
        while True:
            if os.getpid() == 1:
                _send_signal(-1, _signal.SIGKILL)  # everything but ourselves
            for proc in self.procs.values():
                _kill_group(proc.pid, _signal.SIGKILL)
            for pid in _children(os.getpid()):
                _kill_group(pid, _signal.SIGKILL)
            self.reap()
            remaining = deadline - time.monotonic()
            if (not self.procs and not _children(os.getpid())) or remaining <= 0:
                break
            select.select([self.wakeup_r], [], [], min(remaining, 0.1))
            self.on_signals_drain()
        for proc in list(self.procs.values()):
            self.log(f"process {proc.pid} did not die")

    def on_signals_drain(self) -> None:
        try:
            while os.read(self.wakeup_r, 512):
                pass
        except BlockingIOError:
            pass

    def end(self) -> None:
        if self.config.test_mode:
            self.running = False
            return
        try:
            syscalls.reboot(self.config.reboot)
        except OSError as exc:
            console(f"{exc}; exiting, which panics the kernel and ends the VM")
        os._exit(1)


def guest_stats() -> dict[str, Any]:
    with open("/proc/stat", "rb") as file:
        cpu = [int(v) for v in file.readline().split()[1:]]
    meminfo: dict[str, int] = {}
    with open("/proc/meminfo", "rb") as file:
        for line in file:
            key, _, rest = line.partition(b":")
            meminfo[key.decode()] = int(rest.split()[0]) * 1024
    read_bytes = write_bytes = 0
    for name in os.listdir("/sys/block"):
        if name.startswith(("loop", "ram", "zram")):
            continue
        try:
            with open(f"/sys/block/{name}/stat", "rb") as file:
                fields = file.read().split()
        except OSError:
            continue
        read_bytes += int(fields[2]) * 512
        write_bytes += int(fields[6]) * 512
    pids = sum(1 for entry in os.listdir("/proc") if entry.isdigit() and _is_user_process(entry))
    net_rx, net_tx = _net_bytes()
    return {
        "cpu_total": sum(cpu[:8]), "cpu_idle": cpu[3] + cpu[4], "cpus": os.cpu_count() or 1,
        "mem_total": meminfo.get("MemTotal", 0),
        "mem_used": meminfo.get("MemTotal", 0) - meminfo.get("MemAvailable", meminfo.get("MemFree", 0)),
        "block_read": read_bytes, "block_write": write_bytes, "pids": max(0, pids - 1),  # not the agent
        "net_rx": net_rx, "net_tx": net_tx,
    }


def _net_bytes() -> tuple[int, int]:
    """Bytes received and sent on every interface but loopback, as docker's NET I/O counts them."""
    rx = tx = 0
    with open("/proc/net/dev", "rb") as file:
        for line in file.readlines()[2:]:
            name, _, counters = line.partition(b":")
            if name.strip() != b"lo":
                fields = counters.split()
                rx, tx = rx + int(fields[0]), tx + int(fields[8])
    return rx, tx


def _is_user_process(pid: str) -> bool:
    """Kernel threads have an empty command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return bool(file.read(1))
    except OSError:
        return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc}"
    return str(exc)


def _valid_id(cid: str) -> bool:
    return 0 < len(cid) <= 128 and cid.isascii() and cid.replace("-", "").replace("_", "").replace(
        ".", "").isalnum() and not cid.startswith(".")


def _signal_number(value: object) -> int:
    if isinstance(value, int) and 0 < value < _signal.NSIG:
        return value
    if isinstance(value, str):
        name = value.upper()
        number = getattr(_signal, name if name.startswith("SIG") else f"SIG{name}", None)
        if isinstance(number, int):
            return number
        if value.isdigit():
            return _signal_number(int(value))
    raise RequestError(f"invalid signal {value!r}")


def _kill_group(pid: int, signum: int) -> None:
    """Each container process leads its own session; its background jobs share its group."""
    _send_signal(-pid, signum)
    _send_signal(pid, signum)


def _send_signal(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _children(parent: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as file:
                fields = file.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent and fields[0] != b"Z":
            children.append(int(entry))
    return children


# --- boot -------------------------------------------------------------------------------------------


def boot() -> list[str]:
    """The guest's own mounts; each failure is reported and the rest still tried."""
    errors = []
    for op in mounts.boot_plan():
        try:
            mounts.apply([op], [])
        except OSError as exc:
            errors.append(str(exc))
    try:
        netconf.loopback_up()
    except (OSError, netconf.NetconfError) as exc:
        errors.append(f"loopback: {exc}")
    # The kernel opens /dev/console as fds 0-2 only if it exists when init starts.
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            target = os.open("/dev/console", os.O_RDWR | os.O_NOCTTY)
            if target != fd:
                os.dup2(target, fd)
                os.close(target)
    return errors


def isolate_test_run() -> None:
    """Test mode: keep the container's mounts and hostname away from the host running the tests."""
    syscalls.unshare(syscalls.CLONE_NEWNS | syscalls.CLONE_NEWUTS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)


def main() -> None:
    config = Config(dict(os.environ))
    boot_errors: list[str] = []
    if config.test_mode:
        isolate_test_run()
    elif os.getpid() == 1:
        boot_errors = boot()
    if os.getpid() != 1:
        syscalls.set_child_subreaper()
    agent = Agent(config)
    for error in boot_errors:
        console(error)
    try:
        if config.test_mode:
            agent.attach(channels.connect_unix(config.channel[len("unix:"):]))
        else:
            channel, listener = channels.open_guest_channel(config.channel, AGENT_SERIAL_NAME, AGENT_VSOCK_PORT)
            if listener is not None:
                agent.listener = listener
                agent.attach(listener.accept())
                agent.watch(listener.fd, select.EPOLLIN)
            elif channel is not None:
                agent.attach(channel)
    except OSError as exc:
        console(f"cannot open the channel to the host: {exc}")
        if config.test_mode:
            sys.exit(1)
        agent.end()
    for error in boot_errors:
        agent.send_control({"op": "log", "message": f"boot: {error}"})
    sys.exit(agent.run())


if __name__ == "__main__":
    main()
