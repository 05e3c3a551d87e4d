"""Network namespaces that outlive their creator (a bind mount of the namespace on a file, as `ip netns add`
makes), and work done inside one: a helper thread joins it, since setns(2) for a network namespace moves only
the calling thread, and the rest of the process (a gRPC server's threads) stays where it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from micropod import syscalls
from micropod.errors import NetworkError

T = TypeVar("T")
_THREAD_NETNS = "/proc/thread-self/ns/net"


def _in_thread(body: Callable[[], T]) -> T:
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(body())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="netns", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def create(path: Path) -> None:
    """A new, empty network namespace, kept alive by ``path`` (which must not exist yet)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        raise NetworkError(f"cannot create the network namespace file {path}: {exc.strerror}") from None

    def unshare_and_pin() -> None:
        syscalls.unshare(syscalls.CLONE_NEWNET)
        syscalls.mount(_THREAD_NETNS, str(path), None, syscalls.MS_BIND)

    try:
        _in_thread(unshare_and_pin)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise NetworkError(f"cannot create the network namespace {path}: {exc.strerror}") from None


def delete(path: Path) -> None:
    """Idempotent: unpin the namespace (it ends with its last user) and remove its file."""
    with contextlib.suppress(OSError):
        syscalls.umount2(str(path), syscalls.MNT_DETACH)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise NetworkError(f"cannot remove the network namespace {path}: {exc.strerror}") from None


def is_namespace(path: Path) -> bool:
    """Whether ``path`` is a pinned network namespace (the file alone, left by a crash, is not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.fstat(fd).st_dev != os.stat(path.parent).st_dev
    finally:
        os.close(fd)


def run_inside(path: Path, body: Callable[[], T]) -> T:
    """``body()``'s result, run on a thread that has joined the namespace at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise NetworkError(f"cannot open the network namespace {path}: {exc.strerror}") from None

    def joined() -> T:
        syscalls.setns(fd, syscalls.CLONE_NEWNET)
        return body()

    try:
        return _in_thread(joined)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise NetworkError(f"{path} is not a network namespace") from None
        raise
    finally:
        os.close(fd)


def enter(path: Path) -> None:
    """Move the calling thread (a single-threaded process at its start: the pod's monitor) into ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise NetworkError(f"cannot open the pod's network namespace {path}: {exc.strerror}") from None
    try:
        syscalls.setns(fd, syscalls.CLONE_NEWNET)
    except OSError as exc:
        raise NetworkError(f"cannot join the pod's network namespace {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
