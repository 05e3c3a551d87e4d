"""One supervisor per VM, detached from the CLI (like conmon or a containerd shim).

It owns the VMM child and is the only client of the agent channel. It writes the container log
(docker json-file lines), records the exit status in the state store, and cleans up when the VM ends.
The CLI talks to it over its control socket, or over an inherited socket for `run`'s own attach.

Run as ``python -m micropod.monitor --root ROOT VM_ID [--attach-fd N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import selectors
import shutil
import signal
import socket
import sys
import time
from typing import Any

from micropod.agent import protocol
from micropod.channel import AgentLink, Frame, FramedSocket, decode
from micropod.containerlog import ContainerLog
from micropod.errors import AgentError, BootError, ContainerCommandError, MicropodError, TimeoutExpired
from micropod.liveness import ProcessRef
from micropod.paths import StateRoot, VmDir
from micropod.runconfig import RunConfig
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


class Monitor:
    def __init__(self, root: StateRoot, vm_id: str, attach: socket.socket | None) -> None:
        self.root = root
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
        self.log = ContainerLog(self.vm_dir.container_log)
        self.listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        if attach is not None:
            self._add_client(attach, attached=True)

    # -- lifecycle -------------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
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
            self._finish()
        return 0

    def _boot_and_start(self) -> None:
        from micropod.rootfs.upper import create_upper

        if not self.vm_dir.upper.exists():
            create_upper(self.vm_dir.upper, self.cfg.upper_size)
        log.debug("phase: upper disk ready")
        spec = build_spec(self.cfg, self.vm_dir)
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
        rootfs = {"lower": spec.guest_disk(ROOTFS_DRIVE), "upper": spec.guest_disk(UPPER_DRIVE)}
        self._expect_ok(self.link.request("create", deadline, self.vmm_fd, id=MAIN,
                                          spec=self.cfg.container.to_agent(rootfs)), "create")
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
        self.listener = SocketDir(self.vm_dir.path).listen(self.vm_dir.monitor_sock.name)
        self.sel.register(self.listener, selectors.EVENT_READ, "listener")
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
        elif kind == protocol.CONTROL:
            message = decode(payload)
            if message["op"] == "exit" and message.get("sid", MAIN_SID) == MAIN_SID:
                self._on_main_exit(int(message["code"]))
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
        if client is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(client.sock)
            client.close()

    def _on_client(self, fd: int) -> None:
        client = self.clients[fd]
        try:
            frames = client.pump()
        except MicropodError:
            frames = []
        for kind, _stream, payload in frames:
            if kind == protocol.CONTROL:
                try:
                    self._on_request(fd, decode(payload))
                except MicropodError as exc:
                    with contextlib.suppress(MicropodError):
                        client.send_control({"op": "error", "message": str(exc)})
        if client.closed:
            self._drop_client(fd)

    def _on_request(self, fd: int, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "attach":
            self.attached.add(fd)
        elif op == "signal":
            self._signal_main(int(message["signal"]))
        elif op == "stop":
            timeout = float(message.get("timeout", 10))
            self._signal_main(int(message.get("signal") or self.cfg.stop_signal))
            deadline = time.monotonic() + max(0.0, timeout)
            self.kill_deadline = min(self.kill_deadline or float("inf"), deadline)
        elif op == "kill":
            self._kill_vm("killed on request")
        elif op == "wait":
            pass  # every client hears the exit
        else:
            raise AgentError(f"unknown monitor request {op!r}")

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

    def _finish(self) -> None:
        if self.vmm is not None and self.vmm.wait(0) is None:
            if self.link is not None and not self.link.channel.closed:
                with contextlib.suppress(MicropodError):
                    self.link.send("shutdown")
            if self.vmm.wait(SHUTDOWN_GRACE) is None:
                self.vmm.kill()
        self.log.close()
        code = 125 if self.exit_code is None else self.exit_code
        for path in (self.vm_dir.monitor_sock, self.vm_dir.agent_sock, self.vm_dir.qmp_sock,
                     self.vm_dir.api_sock, self.vm_dir.vsock):
            path.unlink(missing_ok=True)
        if self.cfg.auto_remove:
            shutil.rmtree(self.vm_dir.path, ignore_errors=True)
            self.store.delete(self.cfg.vm_id)
        else:
            self.store.update(self.cfg.vm_id, status="exited", exit_code=code, error=self.error,
                              finished=time.time())
        self._broadcast({"op": "exit", "code": code, "error": self.error}, only_attached=False)
        for fd in list(self.clients):
            self._drop_client(fd)

    def _console_tail(self) -> str:
        return log_tail(self.vm_dir.console_log)

    def _install_signals(self) -> None:
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda *_: None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="micropod-monitor")
    parser.add_argument("--root", required=True)
    parser.add_argument("--attach-fd", type=int)
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("vm_id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s.%(msecs)03d %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    attach = socket.socket(fileno=args.attach_fd) if args.attach_fd is not None else None
    root = StateRoot.from_env(args.root)
    return Monitor(root, args.vm_id, attach).run()


if __name__ == "__main__":
    sys.exit(main())
