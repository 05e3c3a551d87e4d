"""The one way micropod runs other programs.

argv lists only, never a shell; a minimal environment; ``+ cmd`` logged under --debug; a failure
reported once, with the tail of the program's stderr.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
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
) -> subprocess.CompletedProcess[bytes]:
    """Run a program to completion; raise CommandError with its stderr tail when it fails."""
    args = _argv(argv)
    log.debug("+ %s", shlex.join(args))
    try:
        proc = subprocess.run(
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
        raise CommandError(f"{args[0]}: command not found", hint="run 'micropod doctor'") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(f"{args[0]} timed out after {timeout}s: {stderr_tail(exc.stderr)}") from exc
    if check and proc.returncode != 0:
        tail = stderr_tail(proc.stderr) or stderr_tail(proc.stdout)
        raise CommandError(f"{shlex.join(args[:3])}{' ...' if len(args) > 3 else ''} failed "
                           f"with exit code {proc.returncode}: {tail}")
    return proc


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
