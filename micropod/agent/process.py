"""Starting one container process: fork, enter the container's root, become the user, exec.

The parent learns whether exec succeeded before it answers the host, through a close-on-exec pipe:
the child writes ``<code> <message>`` there only when it fails, so EOF with nothing read means the
exec happened. Codes follow docker: 127 not found, 126 cannot be invoked, 125 anything else.
"""

from __future__ import annotations

import errno
import os
import select
import stat

from micropod import syscalls
from micropod.agent import users
from micropod.agent.launch import Launch, LaunchError, build_env, write_etc_file

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal  # the same functions and numbers, with stubs
    from typing import Any
else:
    import _signal  # signal.py itself would import enum

# Signals the agent catches or Python ignores; an exec keeps ignored ones ignored, so reset them all.
_RESET_SIGNALS = (
    _signal.SIGCHLD, _signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP, _signal.SIGQUIT,
    _signal.SIGUSR1, _signal.SIGUSR2, _signal.SIGWINCH, _signal.SIGPIPE, _signal.SIGXFSZ,
)
_START_TIMEOUT = 30.0


def look_path(name: str, path: str) -> str:
    """Go's exec.LookPath, as runc uses it, with docker's wording for failures."""
    if "/" in name:
        try:
            st = os.stat(name)
        except OSError as exc:
            raise LaunchError(127, f'exec: "{name}": stat {name}: {_go_strerror(exc)}') from exc
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
            raise LaunchError(126, f'exec: "{name}": permission denied')
        return name
    for directory in path.split(":"):
        candidate = f"{directory or '.'}/{name}"
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return candidate
    raise LaunchError(127, f'exec: "{name}": executable file not found in $PATH')


def _go_strerror(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


class Child:
    """A started process as the parent sees it: the pid and its ends of the stdio plumbing."""

    __slots__ = ("master", "pid", "stderr", "stdin", "stdout")

    def __init__(self, pid: int, stdin: int | None, stdout: int, stderr: int | None, master: int | None):
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.master = master


def spawn(launch: Launch, container: tuple[str, dict[str, Any]] | None = None) -> Child:
    """Start the process; raise LaunchError if it could not be exec'd. With ``container`` (its id and spec)
    it goes through micropod-runtime (micropod/agent/runtime.py); without, it is forked and chrooted here."""
    if not launch.args:
        raise LaunchError(125, "no command specified")
    parent_fds: list[int] = []
    child_fds: list[int] = []
    try:
        if launch.tty:
            master, slave = syscalls.open_pty(f"{launch.root}/dev/pts/ptmx")
            parent_fds.append(master)
            child_fds.append(slave)
            if launch.window:
                syscalls.set_window_size(master, *launch.window)
            stdio = (slave, slave, slave)
            child_ends: tuple[int | None, int, int | None] = (master if launch.stdin else None, master, None)
        else:
            stdin_r: int | None = None
            stdin_w: int | None = None
            if launch.stdin:
                stdin_r, stdin_w = os.pipe()
                parent_fds.append(stdin_w)
                child_fds.append(stdin_r)
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            parent_fds += [out_r, err_r]
            child_fds += [out_w, err_w]
            stdio = (stdin_r if stdin_r is not None else -1, out_w, err_w)
            child_ends = (stdin_w, out_r, err_r)
        if container is not None:
            pid = _through_runtime(launch, container, stdio)
            for fd in child_fds:
                os.close(fd)
            for fd in parent_fds:
                os.set_blocking(fd, False)
            stdin_end, stdout_end, stderr_end = child_ends
            return Child(pid, stdin_end, stdout_end, stderr_end, master=stdout_end if launch.tty else None)
        status_r, status_w = os.pipe()
        parent_fds.append(status_r)
        child_fds.append(status_w)
        pid = os.fork()
        if pid == 0:
            _child(launch, stdio, status_w)  # never returns
    except BaseException:
        for fd in parent_fds + child_fds:
            os.close(fd)
        raise
    for fd in child_fds:
        os.close(fd)
    try:
        failure = _read_failure(status_r, pid)
    finally:
        os.close(status_r)
    if failure is not None:
        os.waitpid(pid, 0)
        for fd in parent_fds:
            if fd != status_r:
                os.close(fd)
        raise failure
    for fd in parent_fds:
        if fd != status_r:
            os.set_blocking(fd, False)
    stdin_end, stdout_end, stderr_end = child_ends
    return Child(pid, stdin_end, stdout_end, stderr_end, master=stdout_end if launch.tty else None)


def _through_runtime(launch: Launch, container: tuple[str, dict[str, Any]], stdio: tuple[int, int, int]) -> int:
    from micropod.agent import runtime

    if stdio[0] < 0:
        stdio = (os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC), stdio[1], stdio[2])
    cid, spec = container
    try:
        if launch.is_exec:
            return runtime.start_exec(cid, launch, stdio)
        return runtime.start_main(cid, launch, spec, stdio)
    finally:
        if stdio[0] not in stdio[1:] and not launch.stdin and not launch.tty:
            os.close(stdio[0])


def _read_failure(status_r: int, pid: int) -> LaunchError | None:
    chunks = []
    while True:
        ready, _, _ = select.select([status_r], [], [], _START_TIMEOUT)
        if not ready:
            os.kill(pid, _signal.SIGKILL)
            os.waitpid(pid, 0)
            return LaunchError(125, f"the process did not start within {_START_TIMEOUT:.0f}s")
        chunk = os.read(status_r, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    if not chunks:
        return None
    code, _, message = b"".join(chunks).decode(errors="replace").partition(" ")
    return LaunchError(int(code) if code.isdigit() else 125, message)


def _child(launch: Launch, stdio: tuple[int, int, int], status_w: int) -> None:
    code = 125
    try:
        _become(launch, stdio)
    except LaunchError as exc:
        code, message = exc.code, exc.message
    except BaseException as exc:  # nothing may escape into a copy of the agent's event loop
        message = f"{type(exc).__name__}: {exc}"
    try:
        os.write(status_w, f"{code} {message}".encode(errors="replace"))
    finally:
        os._exit(code)


def _become(launch: Launch, stdio: tuple[int, int, int]) -> None:
    _signal.set_wakeup_fd(-1)
    for signum in _RESET_SIGNALS:
        _signal.signal(signum, _signal.SIG_DFL)
    os.setsid()
    stdin, stdout, stderr = stdio
    if launch.tty:
        syscalls.set_controlling_tty(stdout)
    if stdin < 0:
        stdin = os.open("/dev/null", os.O_RDONLY)
    for target, fd in enumerate((stdin, stdout, stderr)):
        os.dup2(fd, target)
        os.set_inheritable(target, True)  # dup2 onto itself would keep close-on-exec
    os.umask(0o022)
    os.chroot(launch.root)
    os.chdir("/")
    for path, text in launch.etc_files.items():
        write_etc_file(path, text)
    try:
        user = users.resolve(launch.user)
    except users.UserError as exc:
        raise LaunchError(launch.user_error_code, str(exc)) from exc
    _enter_cwd(launch)
    try:
        os.setgroups(user.groups)
        os.setgid(user.gid)
        os.setuid(user.uid)
    except OSError as exc:
        raise LaunchError(126, f"cannot become user {launch.user!r}: {exc.strerror}") from exc
    env = build_env(launch, user.home)
    name = launch.args[0]
    path = look_path(name, env["PATH"])
    try:
        os.execve(path, launch.args, env)
    except OSError as exc:
        code = 127 if exc.errno == errno.ENOENT else 126
        raise LaunchError(code, f'exec: "{name}": {_go_strerror(exc)}') from exc


def _enter_cwd(launch: Launch) -> None:
    if launch.make_cwd:
        try:
            os.makedirs(launch.cwd, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise LaunchError(126, f"cannot create working directory {launch.cwd}: {exc.strerror}") from exc
    try:
        os.chdir(launch.cwd)
    except OSError as exc:
        raise LaunchError(
            126, f"chdir to cwd ({launch.cwd!r}) set in config.json failed: {_go_strerror(exc)}"
        ) from exc
