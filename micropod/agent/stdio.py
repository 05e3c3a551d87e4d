"""Container stdio: output read from pipes or a terminal goes to the host as DATA and EOF frames, and
the host's stdin frames are written to the process."""

from __future__ import annotations

import errno
import os
import select

from micropod import wire
from micropod.agent.console import write_quietly

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    from micropod.agent.containers import Proc

    class StdioOwner(Protocol):
        """What stdio needs of the agent (micropod/agent/main.py), which imports this module."""

        interest: dict[int, int]

        def watch(self, fd: int, events: int) -> None: ...
        def log(self, message: str) -> None: ...
        def send(self, frame: bytes) -> None: ...

_READ_SIZE = 1 << 16
_DRAIN_LIMIT = 16 << 20  # a grandchild still writing must not keep an exit report back forever


class Stdio:
    def __init__(self, agent: StdioOwner) -> None:
        self.agent = agent
        self.fd_procs: dict[int, Proc] = {}

    def add(self, proc: Proc) -> None:
        for fd in proc.outputs:
            self.fd_procs[fd] = proc
            self.agent.watch(fd, select.EPOLLIN)
        if proc.stdin is not None:
            self.fd_procs[proc.stdin] = proc

    def on_ready(self, fd: int, mask: int) -> None:
        proc = self.fd_procs[fd]
        if fd == proc.stdin and mask & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
            self.flush_stdin(proc)
        if fd in proc.outputs and mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            self.pump(proc, fd, drain=False)

    def feed(self, proc: Proc, kind: int, payload: bytes) -> None:
        if kind == wire.EOF:
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
        interest = self.agent.interest
        if proc.stdin_pending:
            self.agent.watch(fd, interest.get(fd, 0) | select.EPOLLOUT)
        elif proc.stdin_eof:
            self.close_stdin(proc, send_eot=True)
        else:
            self.agent.watch(fd, interest.get(fd, 0) & ~select.EPOLLOUT)

    def close_stdin(self, proc: Proc, send_eot: bool) -> None:
        fd, proc.stdin = proc.stdin, None
        if fd is None:
            return
        if fd != proc.master:
            self.agent.watch(fd, 0)
            self.fd_procs.pop(fd, None)
            os.close(fd)
            return
        self.agent.watch(fd, self.agent.interest.get(fd, 0) & ~select.EPOLLOUT)
        if send_eot:
            # A terminal has no half-close; end-of-file is the EOF character at the start of a line.
            write_quietly(fd, b"\x04")

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
                    self.agent.log(f"reading output of session {proc.sid}: {exc}")
                data = b""
            if not data:
                self.close_output(proc, fd)
                return
            self.agent.send(wire.encode(wire.DATA, proc.outputs[fd], data))
            forwarded += len(data)
            if not drain or forwarded >= _DRAIN_LIMIT:
                return

    def close_output(self, proc: Proc, fd: int) -> None:
        stream = proc.outputs.pop(fd)
        if fd == proc.master:
            # Nobody holds the terminal any more: input cannot be delivered either. close() closes it.
            proc.stdin_pending.clear()
            proc.stdin = None
            self.agent.watch(fd, 0)
        else:
            self.agent.watch(fd, 0)
            self.fd_procs.pop(fd, None)
            os.close(fd)
        self.agent.send(wire.encode(wire.EOF, stream))

    def close(self, proc: Proc) -> None:
        """The process has exited: what it wrote goes out before its exit report, and its fds are closed."""
        for fd in list(proc.outputs):
            self.pump(proc, fd, drain=True)
            if fd in proc.outputs:
                self.close_output(proc, fd)
        proc.stdin_pending.clear()
        self.close_stdin(proc, send_eot=False)
        if proc.master is not None:
            self.agent.watch(proc.master, 0)
            self.fd_procs.pop(proc.master, None)
            os.close(proc.master)
