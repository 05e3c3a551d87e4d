"""Monitors forked from one pre-imported parent per state root, so that their pages are shared.

A monitor started as ``python -m micropod.monitor`` costs 16 MiB PSS, two thirds of it its imports (measured:
23 MiB RSS after importing the supervisor against 9 MiB for a bare interpreter). Forked from a parent that has
imported everything and frozen its objects out of the garbage collector (``gc.freeze``), a monitor shares those
pages copy-on-write with the parent and its siblings (measured: 5.4 MiB PSS each with four).

The forker is a plain process the CLI starts on demand, listening in ``ROOT/forker/`` (0700, root's) for the
same user only, one per caller's context (cgroup and audit session: a monitor takes its forker's). Each request
carries the monitor's arguments and environment, and its log and attach descriptors over SCM_RIGHTS; the forker
forks, the child starts a session of its own and runs the monitor's main, and the reply is its pid. Crash
isolation stays: a forked monitor is a process of its own, and the forker's death ends no monitor (they are
reparented). When no forker listens, the monitor is spawned as before; once a forker has the request, no answer
is an error (never a second monitor for one VM). It serves the code it imported: a request from a different
micropod (another interpreter, a changed source file) makes it exit and a new one start. It exits when idle or
when its state root is gone.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import resource
import signal
import socket
import struct
import sys
import time
import traceback
from pathlib import Path

from micropod import proc
from micropod.errors import MicropodError
from micropod.fsutil import flock, private_dir, private_file
from micropod.paths import StateRoot, switched_on
from micropod.unixsock import SocketDir

REQUEST_MAX = 1 << 16
IDLE_EXIT = 120.0
START_TIMEOUT = 10.0
REPLY_TIMEOUT = 30.0
ATTACH_FD = "{attach}"  # in a request's arguments: the number the attach descriptor gets in the monitor


def enabled() -> bool:
    return switched_on("MICROPOD_MONITOR_FORKER")


def code_identity() -> str:
    """The interpreter and every source file of micropod (name, size, mtime): what a forker must match."""
    package = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(sys.executable.encode())
    for path in sorted(package.rglob("*.py")):
        st = path.stat()
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def forker_dir(root: StateRoot) -> Path:
    return private_dir(root.path / "forker")


def context_name() -> str:
    """One forker per state root and per caller's context, since a monitor takes its forker's: the cgroups (a
    monitor of a CLI run in a login session belongs there, one of the CRI server's to its service) and the
    audit session."""
    h = hashlib.sha256()
    for name in ("cgroup", "loginuid", "sessionid"):
        with contextlib.suppress(OSError):
            h.update(Path(f"/proc/self/{name}").read_bytes() + b"\0")
    return f"forker-{h.hexdigest()[:16]}.sock"


class ForkerError(MicropodError):
    """The forker took the request and did not answer: a monitor may be running, so none is spawned again."""


def fork_monitor(root: StateRoot, args: list[str], env: dict[str, str], log_fd: int,
                 attach_fd: int | None = None) -> int | None:
    """The pid of a monitor the root's forker started (the forker started first if needed); None if no forker
    could take the request, and the caller spawns the monitor itself."""
    if not enabled():
        return None
    fds = [log_fd, *([attach_fd] if attach_fd is not None else [])]
    request = json.dumps({"identity": code_identity(), "args": args, "env": env,
                          "process": process_settings()}).encode()
    name = context_name()
    try:
        sockets = SocketDir(forker_dir(root))
    except OSError:
        return None
    try:
        with flock(sockets.path / f"{name}.lock"):
            for attempt in range(2):
                reply = _ask(sockets, name, request, fds)
                if reply is None or reply.get("stale"):  # nobody listens, or a forker of other code stepped aside
                    if attempt == 0 and _start(root, sockets, name, env):
                        continue
                    return None
                pid = reply.get("pid")
                if isinstance(pid, int) and pid > 0:
                    return pid
                raise ForkerError(f"the monitor forker refused the request: {reply.get('error', reply)}")
    except OSError:
        return None
    finally:
        sockets.close()
    return None


def process_settings() -> dict[str, object]:
    """What a spawned monitor would inherit from its caller and a forked one would take from the forker instead
    (started by an earlier caller): the resource limits, the nice value, the umask and the OOM score
    adjustment."""
    umask = os.umask(0o077)
    os.umask(umask)
    limits = {str(number): list(resource.getrlimit(number)) for number in _RLIMITS}
    try:
        oom = int(Path("/proc/self/oom_score_adj").read_text())
    except (OSError, ValueError):
        oom = 0
    return {"rlimits": limits, "nice": os.getpriority(os.PRIO_PROCESS, 0), "umask": umask, "oom_score_adj": oom}


_RLIMITS = tuple(getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_"))


def apply_process_settings(settings: object) -> None:
    """In the forked child, as root: the caller's process_settings(); what is malformed or refused is left as the
    forker's (a monitor still runs)."""
    if not isinstance(settings, dict):
        return
    limits = settings.get("rlimits")
    for number, pair in limits.items() if isinstance(limits, dict) else ():
        with contextlib.suppress(ValueError, OSError, TypeError):
            soft, hard = pair
            resource.setrlimit(int(number), (int(soft), int(hard)))
    with contextlib.suppress(ValueError, OSError, TypeError):
        os.setpriority(os.PRIO_PROCESS, 0, int(settings.get("nice", 0)))
    with contextlib.suppress(ValueError, TypeError):
        os.umask((int(settings.get("umask", 0o077)) & 0o777) | 0o077)  # never more open than the forker's own
    with contextlib.suppress(ValueError, OSError, TypeError):
        Path("/proc/self/oom_score_adj").write_text(str(int(settings.get("oom_score_adj", 0))))


def _ask(sockets: SocketDir, name: str, request: bytes, fds: list[int]) -> dict[str, object] | None:
    """The forker's reply; None if no forker listens. Once the request is sent, no answer is an error: the
    monitor may have been forked, and a second one for the same VM must never start."""
    try:
        conn = sockets.connect(name, timeout=REPLY_TIMEOUT)
    except OSError:
        return None
    try:
        socket.send_fds(conn, [request], fds)
        reply = conn.makefile("rb").readline(REQUEST_MAX)
        found = json.loads(reply) if reply else None
    except (OSError, ValueError) as exc:
        raise ForkerError(f"the monitor forker did not answer ({exc})", hint=f"see {sockets.path}") from exc
    finally:
        conn.close()
    if not isinstance(found, dict):
        raise ForkerError("the monitor forker did not answer", hint=f"see {sockets.path}")
    return found


def _start(root: StateRoot, sockets: SocketDir, name: str, env: dict[str, str]) -> bool:
    """A new forker for ``root``, in the monitors' environment ``env``, once it listens; False if it does not
    within START_TIMEOUT. -P and "/": no module is ever imported from the caller's working directory."""
    with os.fdopen(private_file(sockets.path / "forker.log"), "ab") as log:
        child = proc.spawn([sys.executable, "-P", "-m", "micropod.monitor.forker", str(root.path), name],
                           stdout=log, stderr=log, new_session=True, cwd=Path("/"), env=env)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and child.poll() is None:
        with contextlib.suppress(OSError):
            sockets.connect(name, timeout=1).close()
            return True
        time.sleep(0.005)
    return False


# The forker itself: everything here runs in its one thread.

def serve(root: Path, name: str) -> int:
    os.umask(0o077)  # its socket and anything it creates are its owner's alone, whatever the caller's umask
    identity = code_identity()  # before the imports: a source changed meanwhile makes the first request stale
    # The monitor's own modules. Preloading what it imports only when needed (the VMM backends, networking, the
    # metadata service's jwt and cryptography) measured worse: 8.9 MiB PSS per monitor at 50 VMs against 7.7.
    import micropod.monitor.main
    import micropod.monitor.pod  # noqa: F401
    sockets = SocketDir(root / "forker")
    listener = sockets.listen(name)
    listener.settimeout(5.0)
    signal.signal(signal.SIGCHLD, _reap)
    gc.collect()
    gc.freeze()  # the collector never writes to what the monitors share
    idle_since = time.monotonic()
    while root.is_dir() and time.monotonic() - idle_since < IDLE_EXIT:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        idle_since = time.monotonic()
        with conn:
            if not _handle(conn, listener, identity):
                return 0  # another micropod asked: it starts its own forker
    return 0


def _reap(_signum: int, _frame: object) -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _handle(conn: socket.socket, listener: socket.socket, identity: str) -> bool:
    conn.settimeout(5.0)
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    fds: list[int] = []
    try:
        if struct.unpack("3i", creds)[1] != os.getuid():
            return True
        message, fds, _, _ = socket.recv_fds(conn, REQUEST_MAX, 2)
        request = json.loads(message)
        args, env = request.get("args"), request.get("env")
        if request.get("identity") != identity:
            conn.sendall(b'{"stale": true}\n')
            return False
        if not (isinstance(args, list) and all(isinstance(a, str) for a in args) and isinstance(env, dict)
                and fds):
            conn.sendall(b'{"error": "a malformed request"}\n')
            return True
        pid = os.fork()
        if pid == 0:
            _run_monitor(listener, conn, args, {str(k): str(v) for k, v in env.items()}, fds, request.get("process"))
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        return True
    except (OSError, ValueError, AttributeError):
        return True
    finally:
        for fd in fds:
            os.close(fd)


def _run_monitor(listener: socket.socket, conn: socket.socket, args: list[str], env: dict[str, str],
                 fds: list[int], settings: object = None) -> None:
    """In the forked child: the caller's process settings, a session of its own, the request's log as stdout and
    stderr, its environment, and the monitor's main; never returns."""
    code = 1
    try:
        apply_process_settings(settings)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        with contextlib.suppress(OSError):  # `ps` and `top` tell a monitor from its forker (its argv is the forker's)
            Path("/proc/self/comm").write_text("micropod-mon")
        listener.close()
        conn.close()
        os.setsid()
        devnull = os.open("/dev/null", os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[0], 2)
        os.close(devnull)
        os.close(fds[0])
        os.environ.clear()
        os.environ.update(env)
        if len(fds) > 1:
            args = [str(fds[1]) if a == ATTACH_FD else a for a in args]
        from micropod.monitor.main import main

        code = main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(serve(Path(sys.argv[1]), sys.argv[2]))
