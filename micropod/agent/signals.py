"""Signals: those the agent catches reach its loop through a wakeup pipe; those it sends go to the
container processes and the process groups they lead."""

from __future__ import annotations

import os

from micropod.agent.errors import RequestError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal  # the same functions and numbers, with stubs
else:
    import _signal  # signal.py itself would import enum

FORWARDED_SIGNALS = (
    _signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP, _signal.SIGQUIT, _signal.SIGUSR1, _signal.SIGUSR2,
)
_WAKEUP_READ = 512


def catch(signums: tuple[int, ...]) -> int:
    """Have ``signums`` written to a non-blocking pipe, whose read end is returned for the loop to watch."""
    wakeup_r, wakeup_w = os.pipe()
    os.set_blocking(wakeup_r, False)
    os.set_blocking(wakeup_w, False)
    _signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
    for signum in signums:
        _signal.signal(signum, _ignore_signal)
    return wakeup_r


def _ignore_signal(signum: int, frame: object) -> None:
    """The C-level handler has already written the signal number to the wakeup pipe."""


def caught(wakeup_r: int) -> set[int]:
    signals: set[int] = set()
    while True:
        try:
            data = os.read(wakeup_r, _WAKEUP_READ)
        except BlockingIOError:
            break
        if not data:
            break
        signals.update(data)
    return signals


def discard(wakeup_r: int) -> None:
    try:
        while os.read(wakeup_r, _WAKEUP_READ):
            pass
    except BlockingIOError:
        pass


def signal_number(value: object) -> int:
    if isinstance(value, int) and 0 < value < _signal.NSIG:
        return value
    if isinstance(value, str):
        name = value.upper()
        number = getattr(_signal, name if name.startswith("SIG") else f"SIG{name}", None)
        if isinstance(number, int):
            return number
        if value.isdigit():
            return signal_number(int(value))
    raise RequestError(f"invalid signal {value!r}")


def kill_group(pid: int, signum: int) -> None:
    """Each container process leads its own session; its background jobs share its group."""
    send_signal(-pid, signum)
    send_signal(pid, signum)


def send_signal(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def children(parent: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as file:
                fields = file.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent and fields[0] != b"Z":
            children.append(int(entry))
    return children
