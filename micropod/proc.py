"""The one way micropod runs other programs.

argv lists only, never a shell; a minimal environment; ``+ cmd`` logged under --debug; a failure
reported once, with the tail of the program's stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from micropod.errors import CommandError

log = logging.getLogger("micropod")

Arg = str | Path
_BASE_ENV_KEYS = ("PATH", "HOME", "TMPDIR", "LANG", "TERM")


def minimal_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in _BASE_ENV_KEYS if k in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.setdefault("LANG", "C.UTF-8")
    if extra:
        env.update(extra)
    return env


def _argv(argv: Sequence[Arg]) -> list[str]:
    return [os.fspath(a) for a in argv]


def stderr_tail(data: bytes | str | None, lines: int = 12) -> str:
    if not data:
        return ""
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return "\n".join(text.strip().splitlines()[-lines:])


def run(
    argv: Sequence[Arg],
    *,
    check: bool = True,
    input: bytes | None = None,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = subprocess.PIPE,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
    output_limit: int | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a program to completion; raise CommandError with its stderr tail when it fails. With ``output_limit``
    its stdout is read as it comes and the program killed past that many bytes (CommandError), and only the last
    STDERR_KEPT bytes of its stderr are kept: a program that prints without end never fills the caller's
    memory."""
    args = _argv(argv)
    log.debug("+ %s", shlex.join(args))
    if output_limit is not None:
        proc = _run_bounded(args, input or b"", env, cwd, timeout, output_limit)
    else:
        proc = _run_whole(args, input, stdin, stdout, env, cwd, timeout)
    if check and proc.returncode != 0:
        tail = stderr_tail(proc.stderr) or stderr_tail(proc.stdout)
        raise CommandError(f"{shlex.join(args[:3])}{' ...' if len(args) > 3 else ''} failed "
                           f"with exit code {proc.returncode}: {tail}")
    return proc


STDERR_KEPT = 1 << 16


def _run_whole(args: list[str], input: bytes | None, stdin: int | IO[Any] | None, stdout: int | IO[Any] | None,
               env: Mapping[str, str] | None, cwd: Path | None,
               timeout: float | None) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(
            args,
            input=input,
            stdin=stdin if input is None else None,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=minimal_env(env),
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise _not_found(args) from exc
    except subprocess.TimeoutExpired as exc:
        raise _timed_out(args, timeout, exc.stderr) from exc


def _not_found(args: list[str]) -> CommandError:
    return CommandError(f"{args[0]}: command not found", hint="run 'micropod doctor'")


def _timed_out(args: list[str], timeout: float | None, stderr: bytes | None) -> CommandError:
    return CommandError(f"{args[0]} timed out after {timeout}s: {stderr_tail(stderr)}")


def _run_bounded(args: list[str], input: bytes, env: Mapping[str, str] | None, cwd: Path | None,
                 timeout: float | None, limit: int) -> subprocess.CompletedProcess[bytes]:
    try:
        # a session of its own: on a timeout or a flood, whatever it started goes too, and holds no pipe open
        child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env=minimal_env(env), cwd=cwd, start_new_session=True)
    except FileNotFoundError as exc:
        raise _not_found(args) from exc
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    deadline = None if timeout is None else time.monotonic() + timeout
    out, err = bytearray(), bytearray()
    pending = memoryview(input)
    with selectors.DefaultSelector() as selector:
        for stream in (child.stdin, child.stdout, child.stderr):
            os.set_blocking(stream.fileno(), False)
        selector.register(child.stdout, selectors.EVENT_READ, out)
        selector.register(child.stderr, selectors.EVENT_READ, err)
        if pending:
            selector.register(child.stdin, selectors.EVENT_WRITE)
        else:
            child.stdin.close()
        try:
            while selector.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise _timed_out(args, timeout, bytes(err))
                for key, _ in selector.select(left):
                    if key.fileobj is child.stdin:
                        try:
                            pending = pending[os.write(child.stdin.fileno(), pending[:1 << 16]):]
                        except BrokenPipeError:
                            pending = pending[:0]
                        if not pending:
                            selector.unregister(child.stdin)
                            child.stdin.close()
                        continue
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        continue
                    kept: bytearray = key.data
                    kept += chunk
                    if kept is out and len(out) > limit:
                        raise CommandError(f"{args[0]} printed more than {limit} bytes")
                    if kept is err and len(err) > STDERR_KEPT:
                        del err[:-STDERR_KEPT]
            returncode = child.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise _timed_out(args, timeout, bytes(err)) from None
            raise
        finally:
            for stream in (child.stdin, child.stdout, child.stderr):
                stream.close()
    return subprocess.CompletedProcess(args, returncode, bytes(out), bytes(err))


def spawn(
    argv: Sequence[Arg],
    *,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    stdout: int | IO[Any] | None = subprocess.DEVNULL,
    stderr: int | IO[Any] | None = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    pass_fds: Sequence[int] = (),
    new_session: bool = False,
    user: int | None = None,
    preexec: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a program and return its handle; the caller owns waiting for it. With ``user``, it runs as that uid,
    with the same gid and no supplementary groups; ``preexec`` runs in the child before the exec (a confined
    VMM's jail, micropod/vmm/qemu_confined.py: only from a process that runs no thread at the time)."""
    args = _argv(argv)
    log.debug("+ %s &", shlex.join(args))
    try:
        return subprocess.Popen(
            args,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=minimal_env(env),
            cwd=cwd,
            pass_fds=tuple(pass_fds),
            start_new_session=new_session,
            user=user,
            group=user,
            extra_groups=[] if user is not None else None,
            preexec_fn=preexec,
        )
    except FileNotFoundError as exc:
        raise CommandError(f"{args[0]}: command not found", hint="run 'micropod doctor'") from exc
