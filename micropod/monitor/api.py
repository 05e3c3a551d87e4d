"""What travels on a monitor's control socket, named once for both ends: the CLI (client) and the monitor.

A control message is a JSON object with an "op" in a CONTROL frame; output and stdin travel beside them in DATA
and EOF frames. The agent channel behind the monitor has its own ops (micropod.agent); some share a name with
these but are another protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

Message = dict[str, Any]


class Op:
    """The values of "op", with the fields each message carries ("?" if it may lack one)."""

    # A client's requests (MonitorClient.request). exec, cp-* and stats are answered, a refused request gets an
    # error, and the rest wait for the exit that every client hears.
    ATTACH: Final = "attach"  # the main process's output to this client, and its stdin from it
    EXEC: Final = "exec"  # spec, detach
    CP_GET: Final = "cp-get"  # path: its tar streams back as the session's stdout
    CP_PUT: Final = "cp-put"  # path: a tar for it streams in as the session's stdin
    RESIZE: Final = "resize"  # rows, cols: of this client's session, or of the main process it is attached to
    SIGNAL: Final = "signal"  # signal: to this client's session, else to the main process
    STOP: Final = "stop"  # timeout, signal?: the VM is killed after the timeout
    KILL: Final = "kill"
    WAIT: Final = "wait"
    SHUTDOWN: Final = "shutdown"  # the end of a maintenance boot (cp on a stopped container); refused otherwise
    STATS: Final = "stats"
    UPDATE: Final = "update"  # the container's config.json has new limits: apply them; answered by UPDATED
    # A pod's monitor also takes these; every request about one of its containers names it ("container").
    ADD: Final = "add"  # container: its disks onto the VM's drive pool, then created and started
    REMOVE: Final = "remove"  # container: an ended one unmounted, its drives back in the pool; answered
    POD_STOP: Final = "pod-stop"  # timeout: every container stopped, then the VM powered off
    POD_KILL: Final = "pod-kill"  # the VM killed at once
    REOPEN_LOG: Final = "reopen-log"  # container: its CRI log file opened again (kubelet rotated it); answered

    # The monitor's messages.
    STARTED: Final = "started"  # id
    EXIT: Final = "exit"  # code, error, restarting?
    EXEC_STARTED: Final = "exec-started"  # sid
    EXEC_EXIT: Final = "exec-exit"  # code, error?
    STATS_REPLY: Final = "stats-reply"  # the guest's counters, or message
    REMOVED: Final = "removed"  # container: its disks are off the VM
    UPDATED: Final = "updated"  # the new limits hold
    LOG_REOPENED: Final = "log-reopened"  # id
    ERROR: Final = "error"  # message: why a request was refused

    # Never on the socket: what MonitorClient.interact returns when the detach keys are typed.
    DETACHED: Final = "detached"


def request(op: str, **fields: Any) -> Message:
    return {"op": op, **fields}


def started_message(vm_id: str) -> Message:
    """The container's main process runs (or, on a maintenance boot, its disks are mounted)."""
    return {"op": Op.STARTED, "id": vm_id}


def exit_message(code: int, error: str | None, restarting: bool = False) -> Message:
    """The container ended; ``restarting`` when its restart policy boots it again, so that a client that
    waits for the end knows it has not come."""
    message: Message = {"op": Op.EXIT, "code": code, "error": error}
    if restarting:
        message["restarting"] = True
    return message


def updated_message() -> Message:
    return {"op": Op.UPDATED}


def log_reopened_message(container: str) -> Message:
    return {"op": Op.LOG_REOPENED, "id": container}


def removed_message(container: str) -> Message:
    return {"op": Op.REMOVED, "id": container}


def exec_started_message(sid: int) -> Message:
    return {"op": Op.EXEC_STARTED, "sid": sid}


def exec_exit_message(code: int, error: str | None = None) -> Message:
    """An exec or cp session ended, or never started; ``error`` is made printable by the caller, since it
    quotes the guest."""
    message: Message = {"op": Op.EXEC_EXIT, "code": code}
    if error is not None:
        message["error"] = error
    return message


def stats_reply_message(counters: Mapping[str, int]) -> Message:
    return {"op": Op.STATS_REPLY, **counters}


def stats_failure_message(reason: str) -> Message:
    return {"op": Op.STATS_REPLY, "message": reason}


def error_message(reason: str) -> Message:
    return {"op": Op.ERROR, "message": reason}


def detached_message() -> Message:
    return {"op": Op.DETACHED}
