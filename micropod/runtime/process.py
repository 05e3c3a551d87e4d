"""The last steps before the container's program runs, shared by init and exec: limits, identity,
capabilities, seccomp, the fds that may pass, and execve. The order is runc's, for the same reasons: limits and
the OOM score need privileges that the capability drop takes away, and seccomp goes last when it can."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from micropod import syscalls as sc
from micropod.errors import OciRuntimeError, ProgramError
from micropod.runtime import caps, seccomp

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Program:
    """``process`` from config.json (or exec's process.json), with the container's seccomp (as in the config,
    or parsed already)."""

    process: Mapping[str, Any]
    seccomp: Mapping[str, Any] | seccomp.Filter | None
    preserve_fds: int = 0

    @property
    def args(self) -> list[str]:
        return [str(a) for a in self.process.get("args") or []]

    @property
    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for entry in self.process.get("env") or []:
            key, _, value = str(entry).partition("=")
            env[key] = value
        return env


def find_executable(program: Program) -> str:
    """args[0] through the process's PATH, as runc resolves it before the container is created."""
    name = program.args[0]
    if "/" in name:  # relative to process.cwd, where the caller is by now
        if not os.path.exists(name):
            raise ProgramError(f'exec: "{name}": stat {name}: no such file or directory', 127)
        if not os.access(name, os.X_OK) or os.path.isdir(name):
            raise ProgramError(f'exec: "{name}": permission denied', 126)
        return name
    for directory in program.env.get("PATH", DEFAULT_PATH).split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise ProgramError(f'exec: "{name}": executable file not found in $PATH', 127)


def seal_imports() -> None:
    """From here on no module can be imported from a file: after pivot_root (or joining the container's mount
    namespace) the files are the image's, and a planted subprocess.py would run as our privileged self."""
    sys.path[:] = []
    sys.path_importer_cache.clear()
    sys.meta_path[:] = [finder for finder in sys.meta_path
                        if getattr(finder, "__name__", "") in ("BuiltinImporter", "FrozenImporter")]


def preload(program: Program, has_hooks: bool) -> None:
    """What the steps after the pivot need, loaded while the files are still the runtime's own."""
    if program.seccomp:
        seccomp.preload()
    if has_hooks:
        import subprocess  # noqa: F401  (hooks.run_hooks imports it)


def enter_cwd(cwd: str) -> None:
    try:
        os.chdir(cwd)
        where = os.getcwd()  # glibc refuses (ENOENT) a directory that is not beneath our root
    except OSError as exc:
        raise ProgramError(f"chdir to cwd ({cwd!r}) set in config.json failed: {(exc.strerror or '').lower()}",
                           126) from None
    if not where.startswith("/"):  # "(unreachable)/...": a directory outside our root (runc's CVE-2024-21626)
        raise ProgramError(f"cwd ({cwd!r}) is outside the container's root", 126)


def apply_limits(process: Mapping[str, Any]) -> None:
    for limit in process.get("rlimits") or []:
        name = str(limit["type"])
        number = getattr(resource, name, None)
        if not isinstance(number, int):
            raise OciRuntimeError(f"process.rlimits: unknown type {name}")
        try:
            resource.setrlimit(number, (int(limit["soft"]), int(limit["hard"])))
        except (OSError, ValueError) as exc:
            raise OciRuntimeError(f"process.rlimits: setting {name}: {exc}") from None
    if "oomScoreAdj" in process:
        Path("/proc/self/oom_score_adj").write_text(str(int(process["oomScoreAdj"])))


def set_identity(process: Mapping[str, Any]) -> None:
    """Groups, gid and uid, keeping capabilities across the uid change; then exactly the configured sets."""
    sets = caps.parse(process.get("capabilities"))  # none given: none at all, as runc 1.1 does
    caps.drop_bounding(sets.bounding)
    user = process.get("user") or {}
    uid, gid = int(user.get("uid", 0)), int(user.get("gid", 0))
    caps.keep_caps_across_setuid()
    groups = [int(g) for g in user.get("additionalGids") or []]
    try:
        if _setgroups_allowed():
            os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise OciRuntimeError(f"process.user: setting uid {uid} gid {gid}: {exc.strerror}") from None
    caps.apply(sets)
    if "umask" in user:
        os.umask(int(user["umask"]))


def _setgroups_allowed() -> bool:
    try:
        return Path("/proc/self/setgroups").read_text().strip() != "deny"
    except OSError:
        return True


# Signals Python or the agent handle or ignore; an exec keeps ignored ones ignored, so each is reset.
_RESET_SIGNALS = ("SIGCHLD", "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH",
                  "SIGPIPE", "SIGXFSZ")


def detach_from_parent(keep: set[int]) -> None:
    """First thing in a forked child: no signal handler or wakeup fd of the parent's (a signal from the
    container must not reach the agent's loop), and no fd of the parent's but ``keep`` and stdio (the agent's
    channel, its uploads' directory fds: nothing the container could reach through /proc/self/fd)."""
    signal.set_wakeup_fd(-1)
    for name in _RESET_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 1 << 20)


def own_executable() -> tuple[int, int]:
    """(st_dev, st_ino) of the interpreter running us, taken before the pivot."""
    st = os.stat("/proc/self/exe")
    return st.st_dev, st.st_ino


def refuse_our_interpreter(path: str, ours: tuple[int, int]) -> None:
    """The program may not be the runtime's own interpreter, directly (``/proc/self/exe``) or as a script's
    ``#!``: running it in the container would hand the container a process whose /proc/PID/exe is our binary,
    to reopen for writing once we exit (runc's CVE-2019-5736)."""
    candidates = [path]
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            head = f.read(256)
        if head.startswith(b"#!"):
            interpreter = head[2:].split(b"\n", 1)[0].strip().split(b" ", 1)[0]
            candidates.append(os.fsdecode(interpreter))
    for candidate in candidates:
        with contextlib.suppress(OSError):
            st = os.stat(candidate)
            if (st.st_dev, st.st_ino) == ours:
                raise ProgramError(f'exec: "{path}": refusing to run the runtime\'s own interpreter', 126)


def close_runtime_fds(keep: int) -> None:
    """Every fd above stdio and the preserved ones closes on exec: nothing of ours reaches the program
    (runc's CVE-2024-21626 leaked a directory fd of the host)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 + keep:
            with contextlib.suppress(OSError):  # the listing's own fd, closed by now
                os.set_inheritable(fd, False)
        elif fd > 2:
            os.set_inheritable(fd, True)


def execute(program: Program, path: str) -> NoReturn:
    """From here the process is the container's program; each failure is one line and exit 1 (our caller
    reports it through the sync socket first, when it has one)."""
    process = program.process
    no_new_privs = bool(process.get("noNewPrivileges"))
    if program.seccomp and not no_new_privs:
        seccomp.load(program.seccomp)  # needs CAP_SYS_ADMIN, which set_identity may drop
    set_identity(process)
    if no_new_privs:
        sc.set_no_new_privs()
    cwd = str(process.get("cwd") or "/")
    enter_cwd(cwd)
    close_runtime_fds(program.preserve_fds)
    for name in _RESET_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    if program.seccomp and no_new_privs:
        seccomp.load(program.seccomp)  # as late as possible: the fewer of our syscalls it must allow
    os.execve(path, program.args, program.env)
