"""One supervisor per VM, detached from the CLI (like conmon or a containerd shim).

It owns the VMM child and is the only client of the agent channel. It writes the container log
(docker json-file lines), records the exit status in the state store, and cleans up when the VM ends.
The CLI talks to it over its control socket, or over an inherited socket for `run`'s own attach.

Run as ``python -m micropod.monitor --root ROOT VM_ID [--attach-fd N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import selectors
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from micropod.agent import protocol
from micropod.channel import AgentLink, Frame, FramedSocket, decode
from micropod.containerlog import ContainerLog
from micropod.errors import AgentError, BootError, ContainerCommandError, MicropodError, TimeoutExpired
from micropod.liveness import ProcessRef
from micropod.net import lifecycle
from micropod.paths import StateRoot, VmDir
from micropod.runconfig import RunConfig, restart_backoff
from micropod.state import StateStore
from micropod.unixsock import SocketDir
from micropod.vmm import snapshot
from micropod.vmm.base import Vmm, VmSpec
from micropod.vmm.child import log_tail
from micropod.vmm.factory import ROOTFS_DRIVE, UPPER_DRIVE, build_spec, create_vmm

log = logging.getLogger("micropod.monitor")

MAIN = "main"
MAIN_SID = 1
SHUTDOWN_GRACE = 10.0
EXIT_KILLED = 128 + int(signal.SIGKILL)
FIRST_EXEC_SID = 2
BACKOFF_RESET = 10.0  # a run this long resets the restart delay, as docker does


@dataclass
class Session:
    """An exec'd process: its stream id in the agent, and the client that sees its output (if any)."""

    sid: int
    client: int | None
    started: bool = False


class Monitor:
    def __init__(self, root: StateRoot, vm_id: str, attach: socket.socket | None, maintenance: bool = False) -> None:
        self.root = root
        # Maintenance: boot a stopped container's VM with its disks mounted but no process started, for
        # `cp`; the state store's record is left to the client, and no restart policy applies.
        self.maintenance = maintenance
        self.vm_dir: VmDir = root.vm(vm_id)
        self.cfg = RunConfig.load(self.vm_dir.config)
        self.store = StateStore(root.db)
        self.sel = selectors.DefaultSelector()
        self.clients: dict[int, FramedSocket] = {}
        self.attached: set[int] = set()
        self.link: AgentLink | None = None
        self.vmm: Vmm | None = None
        self.vmm_fd: int | None = None
        self.exit_code: int | None = None
        self.error: str | None = None
        self.kill_deadline: float | None = None
        self.done = False
        self.user_stopped = False
        self.restarts = 0
        self.backoff_step = 0
        self.net_attached = False
        self.log = ContainerLog(self.vm_dir.container_log, self.cfg.log.max_size, self.cfg.log.max_files)
        self.listener: socket.socket | None = None
        self.sessions: dict[int, Session] = {}
        self.client_sid: dict[int, int] = {}
        self.pending: dict[int, Callable[[dict[str, Any]], None]] = {}
        self._sids = itertools.count(FIRST_EXEC_SID)
        self._wake_r, self._wake_w = socket.socketpair()
        if attach is not None:
            self._add_client(attach, attached=True)

    # -- lifecycle -------------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        try:
            while True:
                started = time.monotonic()
                self._run_once()
                code = 125 if self.exit_code is None else self.exit_code
                if self.maintenance or not self.cfg.restart.wants_restart(code, self.restarts, self.user_stopped):
                    break
                if time.monotonic() - started >= BACKOFF_RESET:
                    self.backoff_step = 0
                self._record_restart(code)
                if not self._backoff(restart_backoff(self.backoff_step)):
                    break
                self.backoff_step += 1
                self._reset()
        finally:
            self._finish()
        return 0

    def _run_once(self) -> None:
        """One boot of the VM until it ends; every failure becomes an exit code and an error."""
        try:
            self._boot_and_start()
            self._loop()
        except ContainerCommandError as exc:
            self._set_exit(exc.exit_code, exc.message)
        except MicropodError as exc:
            self._set_exit(exc.exit_code, str(exc))
        except Exception as exc:  # the monitor must always record an ending and clean up
            log.exception("monitor failure")
            self._set_exit(125, f"monitor failure: {exc!r}")
        finally:
            self._end_vm()

    def _record_restart(self, code: int) -> None:
        """The restart policy wants another boot: say so, like docker's "Restarting (code)"."""
        self.restarts += 1
        log.info("restarting the VM (restart %d) after exit code %d", self.restarts, code)
        self.store.update(self.cfg.vm_id, status="restarting", exit_code=code, error=self.error,
                          finished=time.time(), restart_count=self.restarts)
        self._broadcast({"op": "exit", "code": code, "error": self.error, "restarting": True}, only_attached=False)
        for fd in list(self.clients):
            self._drop_client(fd)

    def _backoff(self, delay: float) -> bool:
        """Wait ``delay`` seconds, serving clients; False if a stop, a kill or a signal came meanwhile."""
        self.sel.close()
        self.sel = selectors.DefaultSelector()
        self._ensure_listener()
        self.sel.register(self._wake_r, selectors.EVENT_READ, "signal")
        deadline = time.monotonic() + delay
        while not self.user_stopped:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            for key, _ in self.sel.select(remaining):
                if key.data == "signal":
                    self._wake_r.recv(64)
                    self.user_stopped = True
                else:
                    self._dispatch(key.data, key.fileobj)
        return False

    def _reset(self) -> None:
        for fd in list(self.clients):
            self._drop_client(fd)
        self.sel.close()
        self.sel = selectors.DefaultSelector()
        self.exit_code = None
        self.error = None
        self.kill_deadline = None
        self.done = False
        self.link = None
        self.vmm = None
        self.sessions.clear()
        self.client_sid.clear()
        self.pending.clear()
        for path in (self.vm_dir.agent_sock, self.vm_dir.qmp_sock, self.vm_dir.api_sock, self.vm_dir.vsock):
            path.unlink(missing_ok=True)

    def _boot_and_start(self) -> None:
        from micropod.rootfs.upper import create_upper

        if not self.vm_dir.upper.exists():
            create_upper(self.vm_dir.upper, self.cfg.upper_size)
        log.debug("phase: upper disk ready")
        network = self.cfg.network
        if network.enabled and not self.maintenance and not self.net_attached:
            lifecycle.attach(self.root, self.cfg.vm_id, network)
            self.net_attached = True
            log.debug("phase: network attached (%s on %s)", network.tap, network.bridge)
        spec = build_spec(self.cfg, self.vm_dir, with_network=self.net_attached)
        deadline = time.monotonic() + self.cfg.boot_timeout
        try:
            self._launch(spec, deadline, warm=True)
        except BootError as exc:
            vmm = self.vmm
            if vmm is None or not vmm.warm:
                raise
            # A snapshot that does not restore is useless to every later run too: drop it, boot cold.
            log.warning("restoring the boot snapshot failed, booting cold: %s", exc)
            vmm.kill()
            snapshot.invalidate(getattr(vmm, "snapshot", None))
            self._launch(spec, time.monotonic() + self.cfg.boot_timeout, warm=False)
        assert self.link is not None
        if self.net_attached:
            self._expect_ok(self.link.request("network", deadline, self.vmm_fd,
                                              **lifecycle.agent_request(network)), "network")
        rootfs = {"lower": spec.guest_disk(ROOTFS_DRIVE), "upper": spec.guest_disk(UPPER_DRIVE)}
        self._expect_ok(self.link.request("create", deadline, self.vmm_fd, id=MAIN,
                                          spec=self.cfg.container.to_agent(rootfs)), "create")
        if self.maintenance:
            log.debug("phase: container mounted for maintenance")
            self._broadcast({"op": "started", "id": self.cfg.vm_id})
            return
        reply = self.link.request("start", deadline, self.vmm_fd, id=MAIN, sid=MAIN_SID)
        self._expect_ok(reply, "start")
        log.debug("phase: container started")
        self.store.update(self.cfg.vm_id, status="running", started=time.time())
        self._broadcast({"op": "started", "id": self.cfg.vm_id})

    def _launch(self, spec: VmSpec, deadline: float, warm: bool) -> None:
        """Start the VMM and get a live agent channel: a fresh boot's hello, or a restored VM's reply."""
        if self.vmm_fd is not None:
            os.close(self.vmm_fd)
            self.vmm_fd = None
        self.vmm = create_vmm(self.cfg.backend, spec, warm=warm)
        self.vmm.start()
        log.debug("phase: VMM started (%s)", "from snapshot" if self.vmm.warm else "cold boot")
        pid = self.vmm.pid
        if pid is not None:
            ref = ProcessRef.of(pid)
            if ref:
                self.store.update(self.cfg.vm_id, vmm_pid=ref.pid, vmm_start=ref.started)
            self.vmm_fd = os.pidfd_open(pid)
        channel = FramedSocket(self.vmm.connect_agent(self.cfg.boot_timeout))
        self.link = AgentLink(channel, self._on_frame)
        if not self.vmm.warm:
            self._await_hello(channel, deadline)
            log.debug("phase: agent hello")
            return
        try:
            reply = self.link.request("restore", deadline, self.vmm_fd, entropy=os.urandom(64).hex(), time=time.time())
        except (AgentError, TimeoutExpired) as exc:
            raise BootError(f"the restored VM's agent did not answer ({exc}); console tail:\n"
                            f"{self._console_tail()}") from None
        if reply["op"] != "ok":
            raise BootError(f"the restored VM's agent refused restore: {reply.get('message')}")
        log.debug("phase: agent restored")

    def _await_hello(self, channel: FramedSocket, deadline: float) -> None:
        try:
            while True:
                frame = channel.next_frame(deadline, also_watch=self.vmm_fd)
                if frame is None:
                    raise BootError(f"the VM exited during boot:\n{self._console_tail()}")
                if frame[0] == protocol.CONTROL:
                    message = decode(frame[2])
                    if message["op"] == "hello":
                        log.debug("agent hello at guest uptime %.3fs", message.get("uptime", -1))
                        return
        except TimeoutExpired:
            raise BootError(f"the guest agent did not come up within {self.cfg.boot_timeout:.0f}s; "
                            f"console tail:\n{self._console_tail()}") from None
        except AgentError:
            # The channel closes when the guest dies early; let the VMM finish so the tail is whole.
            if self.vmm is not None:
                self.vmm.wait(2.0)
            raise BootError(f"the guest failed to boot; console tail:\n{self._console_tail()}") from None

    def _expect_ok(self, reply: dict[str, Any], what: str) -> None:
        if reply["op"] == "ok":
            return
        message = str(reply.get("message", f"{what} failed"))
        raise ContainerCommandError(message, int(reply.get("code") or 125))

    def _loop(self) -> None:
        assert self.link is not None
        self._ensure_listener()
        self.sel.register(self.link.channel.sock, selectors.EVENT_READ, "agent")
        self.sel.register(self._wake_r, selectors.EVENT_READ, "signal")
        if self.vmm_fd is not None:
            self.sel.register(self.vmm_fd, selectors.EVENT_READ, "vmm")
        while not self.done:
            timeout = None if self.kill_deadline is None else max(0.0, self.kill_deadline - time.monotonic())
            events = self.sel.select(timeout)
            if self.kill_deadline is not None and time.monotonic() >= self.kill_deadline:
                self._kill_vm("stop timeout expired")
            for key, _ in events:
                self._dispatch(key.data, key.fileobj)

    def _ensure_listener(self) -> None:
        if self.listener is None:
            self.listener = SocketDir(self.vm_dir.path).listen(self.vm_dir.monitor_sock.name)
        self.sel.register(self.listener, selectors.EVENT_READ, "listener")

    def _dispatch(self, what: Any, fileobj: Any) -> None:
        if what == "listener":
            conn, _ = fileobj.accept()
            self._add_client(conn, attached=False)
        elif what == "agent":
            assert self.link is not None
            try:
                frames = self.link.channel.pump()
            except AgentError:
                frames = []
            for frame in frames:
                self._on_frame(frame)
            if self.link.channel.closed:
                self.sel.unregister(self.link.channel.sock)
                if self.exit_code is None:
                    self._wait_vmm_gone()
        elif what == "vmm":
            self._on_vmm_exit()
        elif what == "signal":
            self._wake_r.recv(64)
            self.user_stopped = True
            self._kill_vm("the monitor was asked to terminate")
        elif isinstance(what, int):
            self._on_client(what)

    # -- agent events ----------------------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        kind, stream, payload = frame
        if kind == protocol.DATA:
            sid, fd = protocol.split_stream(stream)
            if sid == MAIN_SID and fd in (protocol.STDOUT, protocol.STDERR):
                self.log.write("stdout" if fd == protocol.STDOUT else "stderr", payload)
                self._to_attached(lambda c: c.send_data(fd, payload))
            elif sid in self.sessions and fd in (protocol.STDOUT, protocol.STDERR):
                self._to_session(self.sessions[sid], lambda c: c.send_data(fd, payload))
        elif kind == protocol.CONTROL:
            message = decode(payload)
            if message["op"] in ("ok", "error") and message.get("req") in self.pending:
                self.pending.pop(message["req"])(message)
            elif message["op"] == "exit" and message.get("sid", MAIN_SID) == MAIN_SID:
                self._on_main_exit(int(message["code"]))
            elif message["op"] == "exit":
                self._on_exec_exit(int(message["sid"]), int(message["code"]), message.get("message"))
            elif message["op"] == "syslog":
                # The guest's /dev/log goes to the container log as its own stream; `logs` shows it on stderr.
                text = str(message.get("message", "")).rstrip("\n") + "\n"
                self.log.write("syslog", text.encode(errors="surrogateescape"))
            elif message["op"] == "log":
                log.info("agent: %s", message.get("message"))

    def _on_main_exit(self, code: int) -> None:
        log.debug("phase: container exited with %d", code)
        if self.exit_code is None:
            self.exit_code = code
        assert self.link is not None
        with contextlib.suppress(AgentError):
            self.link.send("shutdown")
        # The agent powers the VM off; bound that with a kill deadline.
        self.kill_deadline = time.monotonic() + SHUTDOWN_GRACE

    def _end_maintenance(self) -> None:
        """A clean power-off: the agent unmounts the container's disks first."""
        self.user_stopped = True
        if self.exit_code is None:
            self._on_main_exit(0)

    def _on_vmm_exit(self) -> None:
        log.debug("phase: VMM exited")
        if self.exit_code is None:
            self._set_exit(EXIT_KILLED, f"the VM exited unexpectedly; console tail:\n{self._console_tail()}")
        self.done = True

    def _wait_vmm_gone(self) -> None:
        """The agent channel closed without an exit: the VM is going down; give it a moment."""
        self.kill_deadline = min(self.kill_deadline or float("inf"), time.monotonic() + SHUTDOWN_GRACE)

    def _kill_vm(self, reason: str) -> None:
        log.info("killing the VM: %s", reason)
        if self.exit_code is None:
            self.exit_code = EXIT_KILLED
        if self.vmm is not None:
            self.vmm.kill()
        self.done = True

    # -- clients ---------------------------------------------------------------------------------

    def _add_client(self, sock: socket.socket, attached: bool) -> None:
        sock.setblocking(False)
        client = FramedSocket(sock)
        self.clients[sock.fileno()] = client
        if attached:
            self.attached.add(sock.fileno())
        self.sel.register(sock, selectors.EVENT_READ, sock.fileno())

    def _drop_client(self, fd: int) -> None:
        client = self.clients.pop(fd, None)
        self.attached.discard(fd)
        sid = self.client_sid.pop(fd, None)
        session = self.sessions.get(sid) if sid is not None else None
        if session is not None:
            # Like a terminal hanging up: the process hears SIGHUP, and its output goes nowhere.
            session.client = None
            if session.started:
                self._agent_send("signal", id=MAIN, sid=session.sid, signal=int(signal.SIGHUP))
        if client is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(client.sock)
            client.close()
            if self.maintenance and not self.clients and not self.done:
                self._end_maintenance()  # nobody is left to copy anything

    def _on_client(self, fd: int) -> None:
        client = self.clients[fd]
        try:
            frames = client.pump()
        except MicropodError:
            frames = []
        for kind, stream, payload in frames:
            if kind == protocol.CONTROL:
                try:
                    self._on_request(fd, decode(payload))
                except MicropodError as exc:
                    with contextlib.suppress(MicropodError):
                        client.send_control({"op": "error", "message": str(exc)})
            elif stream == protocol.STDIN:
                self._on_client_stdin(fd, kind, payload)
        if client.closed:
            self._drop_client(fd)

    def _on_request(self, fd: int, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "attach":
            self.attached.add(fd)
        elif op == "exec":
            self._start_exec(fd, message, "exec", {"spec": message.get("spec") or {}})
        elif op in ("cp-get", "cp-put"):
            self._start_exec(fd, message, "archive-get" if op == "cp-get" else "archive-put",
                             {"path": str(message["path"])})
        elif op == "resize":
            sid = self.client_sid.get(fd, MAIN_SID if fd in self.attached else None)
            if sid is not None and self.exit_code is None:
                self._agent_send("resize", sid=sid, rows=int(message["rows"]), cols=int(message["cols"]))
        elif op == "signal" and fd in self.client_sid:
            session = self.sessions.get(self.client_sid[fd])
            if session is not None and session.started:
                self._agent_send("signal", id=MAIN, sid=session.sid, signal=int(message["signal"]))
        elif op == "signal":
            self._signal_main(int(message["signal"]))
        elif op == "stop":
            self.user_stopped = True
            timeout = float(message.get("timeout", 10))
            self._signal_main(int(message.get("signal") or self.cfg.stop_signal))
            deadline = time.monotonic() + max(0.0, timeout)
            self.kill_deadline = min(self.kill_deadline or float("inf"), deadline)
        elif op == "kill":
            self.user_stopped = True
            self._kill_vm("killed on request")
        elif op == "wait":
            pass  # every client hears the exit
        elif op == "shutdown" and self.maintenance:
            self._end_maintenance()
        elif op == "stats":
            client = self.clients[fd]

            def answer(reply: dict[str, Any]) -> None:
                fields = {k: v for k, v in reply.items() if k not in ("op", "req")}
                with contextlib.suppress(MicropodError):
                    client.send_control({"op": "stats-reply", **fields})

            if self.exit_code is not None or self.link is None:
                answer({"op": "error", "message": "the container is not running"})
            else:
                self._agent_send("stats", answer)
        else:
            raise AgentError(f"unknown monitor request {op!r}")

    # -- exec sessions and stdin --------------------------------------------------------------------

    def _agent_send(self, op: str, reply: Callable[[dict[str, Any]], None] | None = None, **fields: Any) -> None:
        """A request to the agent whose answer, if wanted, comes back through ``reply`` in the loop."""
        if self.link is None or self.link.channel.closed:
            if reply is not None:
                reply({"op": "error", "message": "the VM is not running", "code": 125})
            return
        try:
            req = self.link.send(op, **fields)
        except AgentError:
            if reply is not None:
                reply({"op": "error", "message": "the agent channel is gone", "code": 125})
            return
        if reply is not None:
            self.pending[req] = reply

    def _start_exec(self, fd: int, message: dict[str, Any], agent_op: str, fields: dict[str, Any]) -> None:
        """A session (an exec'd process, or a cp's tar stream) routed between one client and the agent."""
        if self.exit_code is not None or self.kill_deadline is not None:
            raise ContainerCommandError(f"container {self.cfg.vm_id} is not running", 125)
        if fd in self.client_sid:
            raise AgentError("this connection already runs an exec session")
        detach = bool(message.get("detach"))
        session = Session(next(self._sids), None if detach else fd)
        self.sessions[session.sid] = session
        if not detach:
            self.client_sid[fd] = session.sid

        def started(reply: dict[str, Any]) -> None:
            if reply["op"] == "ok":
                session.started = True
                if session.sid not in self.sessions:
                    return  # it has already ended (a cp-get streams everything before its reply)
                self._to_session(session, lambda c: c.send_control({"op": "exec-started", "sid": session.sid}),
                                 also=fd)
                return
            self.sessions.pop(session.sid, None)
            self.client_sid.pop(fd, None)
            self._to_session(session, lambda c: c.send_control(
                {"op": "exec-exit", "code": int(reply.get("code") or 125), "error": reply.get("message")}), also=fd)

        self._agent_send(agent_op, started, id=MAIN, sid=session.sid, **fields)

    def _on_exec_exit(self, sid: int, code: int, error: str | None = None) -> None:
        session = self.sessions.pop(sid, None)
        if session is None:
            return
        if session.client is not None:
            self.client_sid.pop(session.client, None)
        report: dict[str, Any] = {"op": "exec-exit", "code": code}
        if error:
            report["error"] = error
        self._to_session(session, lambda c: c.send_control(report))

    def _to_session(self, session: Session, send: Any, also: int | None = None) -> None:
        fd = session.client if session.client is not None else also
        client = self.clients.get(fd) if fd is not None else None
        if client is None:
            return
        try:
            send(client)
        except MicropodError:
            self._drop_client(client.fileno())

    def _on_client_stdin(self, fd: int, kind: int, payload: bytes) -> None:
        """A client's stdin goes to its exec session, or to the main process for an attached client."""
        if fd in self.client_sid:
            sid = self.client_sid[fd]
            if not self.sessions[sid].started:
                return
        elif fd in self.attached and self.cfg.container.stdin:
            sid = MAIN_SID
        else:
            return
        if self.link is None or self.exit_code is not None:
            return
        try:
            stream = protocol.stream_id(sid, protocol.STDIN)
            if kind == protocol.EOF:
                self.link.channel.send_eof(stream)
            else:
                self.link.channel.send_data(stream, payload)
        except AgentError:
            self._kill_vm("the agent channel is gone")

    def _signal_main(self, signum: int) -> None:
        if self.link is None or self.exit_code is not None:
            return
        try:
            self.link.send("signal", id=MAIN, signal=signum)
        except AgentError:
            self._kill_vm("the agent channel is gone")

    def _to_attached(self, send: Any) -> None:
        for fd in list(self.attached):
            try:
                send(self.clients[fd])
            except (MicropodError, KeyError):
                self._drop_client(fd)

    def _broadcast(self, message: dict[str, Any], only_attached: bool = True) -> None:
        targets = self.attached if only_attached else set(self.clients)
        for fd in list(targets):
            try:
                self.clients[fd].send_control(message)
            except (MicropodError, KeyError):
                self._drop_client(fd)

    # -- ending ----------------------------------------------------------------------------------

    def _set_exit(self, code: int, error: str | None) -> None:
        if self.exit_code is None:
            self.exit_code = code
        if error and self.error is None:
            self.error = error

    def _end_vm(self) -> None:
        if self.vmm is not None and self.vmm.wait(0) is None:
            if self.link is not None and not self.link.channel.closed:
                with contextlib.suppress(MicropodError):
                    self.link.send("shutdown")
            if self.vmm.wait(SHUTDOWN_GRACE) is None:
                self.vmm.kill()
        if self.link is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self.link.channel.sock)
            self.link.channel.close()
        if self.vmm_fd is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self.vmm_fd)
            os.close(self.vmm_fd)
            self.vmm_fd = None
        self.log.close()

    def _finish(self) -> None:
        code = 125 if self.exit_code is None else self.exit_code
        for path in (self.vm_dir.monitor_sock, self.vm_dir.agent_sock, self.vm_dir.qmp_sock,
                     self.vm_dir.api_sock, self.vm_dir.vsock):
            path.unlink(missing_ok=True)
        self._detach_network()
        if self.maintenance:
            pass
        elif self.cfg.auto_remove:
            shutil.rmtree(self.vm_dir.path, ignore_errors=True)
            if self.cfg.network.enabled:
                lifecycle.release_lease(self.root, self.cfg.vm_id)
            self.store.delete(self.cfg.vm_id)
        else:
            self.store.update(self.cfg.vm_id, status="exited", exit_code=code, error=self.error,
                              finished=time.time())
        self._broadcast({"op": "exit", "code": code, "error": self.error}, only_attached=False)
        for fd in list(self.clients):
            self._drop_client(fd)

    def _detach_network(self) -> None:
        if not self.net_attached:
            return
        try:
            lifecycle.detach(self.root, self.cfg.vm_id, self.cfg.network)
        except MicropodError as exc:
            # reconciliation retries it; the exit must still be recorded
            log.error("tearing down the VM's network failed: %s", exc)
            self._set_exit(125, f"tearing down the VM's network failed: {exc}")
        self.net_attached = False

    def _console_tail(self) -> str:
        return log_tail(self.vm_dir.console_log) or "(no output)"

    def _install_signals(self) -> None:
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda *_: None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="micropod-monitor")
    parser.add_argument("--root", required=True)
    parser.add_argument("--attach-fd", type=int)
    parser.add_argument("--maintenance", action="store_true")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("vm_id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s.%(msecs)03d %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    attach = socket.socket(fileno=args.attach_fd) if args.attach_fd is not None else None
    root = StateRoot.from_env(args.root)
    return Monitor(root, args.vm_id, attach, maintenance=args.maintenance).run()


if __name__ == "__main__":
    sys.exit(main())
