"""Monitors forked from one pre-imported parent per state root, so that their pages are shared.

A monitor started as ``python -m micropod.monitor`` costs 16 MiB PSS, two thirds of it its imports (measured:
23 MiB RSS after importing the supervisor against 9 MiB for a bare interpreter). Forked from a parent that has
imported everything and frozen its objects out of the garbage collector (``gc.freeze``), a monitor shares those
pages copy-on-write with the parent and its siblings (measured: 5.4 MiB PSS each with four).

The forker is a plain process the CLI starts on demand, listening on ``ROOT/forker/forker.sock`` (0700, root's)
for the same user only. Each request carries the monitor's arguments and environment, and its log and attach
descriptors over SCM_RIGHTS; the forker forks, the child starts a session of its own and runs the monitor's
main, and the reply is its pid. Crash isolation stays: a forked monitor is a process of its own, and the
forker's death ends no monitor (they are reparented); a request it cannot take (gone, stale code, any error)
falls back to spawning the monitor as before. It serves the code it imported: a request from a different
micropod (another interpreter, a changed source file) makes it exit and a new one start. It exits when idle or
when its state root is gone.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time
import traceback
from pathlib import Path

from micropod import proc
from micropod.fsutil import flock, private_dir, private_file
from micropod.paths import StateRoot
from micropod.unixsock import SocketDir

SOCK = "forker.sock"
REQUEST_MAX = 1 << 16
IDLE_EXIT = 120.0
START_TIMEOUT = 10.0
ATTACH_FD = "{attach}"  # in a request's arguments: the number the attach descriptor gets in the monitor


def enabled() -> bool:
    return os.environ.get("MICROPOD_MONITOR_FORKER", "1") not in ("0", "false", "no", "off")


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


def fork_monitor(root: StateRoot, args: list[str], env: dict[str, str], log_fd: int,
                 attach_fd: int | None = None) -> int | None:
    """The pid of a monitor the root's forker started (the forker started first if needed); None if it could
    not, and the caller spawns the monitor itself."""
    if not enabled():
        return None
    fds = [log_fd, *([attach_fd] if attach_fd is not None else [])]
    request = json.dumps({"identity": code_identity(), "args": args, "env": env}).encode()
    sockets = SocketDir(forker_dir(root))
    try:
        with flock(sockets.path / "start.lock"):
            for attempt in range(2):
                pid = (_ask(sockets, request, fds) or {}).get("pid")
                if isinstance(pid, int) and pid > 0:
                    return pid
                if attempt == 0 and not _start(root, sockets):
                    return None
    except OSError:
        return None
    finally:
        sockets.close()
    return None


def _ask(sockets: SocketDir, request: bytes, fds: list[int]) -> dict[str, object] | None:
    try:
        conn = sockets.connect(SOCK, timeout=START_TIMEOUT)
    except OSError:
        return None
    try:
        socket.send_fds(conn, [request], fds)
        reply = conn.makefile("rb").readline(REQUEST_MAX)
        found = json.loads(reply) if reply else None
    except (OSError, ValueError):
        return None
    finally:
        conn.close()
    return found if isinstance(found, dict) else None


def _start(root: StateRoot, sockets: SocketDir) -> bool:
    """A new forker for ``root``, once it listens; False if it does not within START_TIMEOUT."""
    with os.fdopen(private_file(sockets.path / "forker.log"), "ab") as log:
        child = proc.spawn([sys.executable, "-m", "micropod.monitor.forker", str(root.path)], stdout=log,
                           stderr=log, new_session=True, env={k: v for k, v in os.environ.items()
                                                              if k.startswith("MICROPOD_") or k == "PYTHONPATH"})
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and child.poll() is None:
        with contextlib.suppress(OSError):
            sockets.connect(SOCK, timeout=1).close()
            return True
        time.sleep(0.005)
    return False


# The forker itself: everything here runs in its one thread.

def serve(root: Path) -> int:
    import micropod.monitor.main
    import micropod.monitor.pod  # noqa: F401

    identity = code_identity()
    sockets = SocketDir(root / "forker")
    listener = sockets.listen(SOCK)
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
            return True
        pid = os.fork()
        if pid == 0:
            _run_monitor(listener, conn, args, {str(k): str(v) for k, v in env.items()}, fds)
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        return True
    except (OSError, ValueError, AttributeError):
        return True
    finally:
        for fd in fds:
            os.close(fd)


def _run_monitor(listener: socket.socket, conn: socket.socket, args: list[str], env: dict[str, str],
                 fds: list[int]) -> None:
    """In the forked child: a session of its own, the request's log as stdout and stderr, its environment, and
    the monitor's main; never returns."""
    code = 1
    try:
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
    sys.exit(serve(Path(sys.argv[1])))
