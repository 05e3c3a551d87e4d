"""What a container process is to be, as the agent builds it from the host's create or exec spec, and the
parts of it both ways of starting one share (the chroot in micropod/agent/process.py, micropod-runtime in
micropod/agent/runtime.py): docker's environment, /etc files and error codes."""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class LaunchError(Exception):
    """The process could not be started; ``code`` is docker's exit code for it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Launch:
    """What the container process needs to be: built by the agent from the create/exec spec."""

    __slots__ = ("args", "cwd", "env", "etc_files", "hostname", "is_exec", "make_cwd", "root", "stdin", "tty",
                 "user", "user_error_code", "window")

    def __init__(self, root: str, spec: dict[str, Any], *, is_exec: bool) -> None:
        self.root = root
        self.is_exec = is_exec
        self.args: list[str] = list(spec.get("args") or [])
        self.env: list[str] = list(spec.get("env") or [])
        self.cwd: str = spec.get("cwd") or "/"
        self.user: str = spec.get("user") or ""
        self.hostname: str = spec.get("hostname") or ""
        self.stdin = bool(spec.get("stdin"))
        self.tty = bool(spec.get("tty"))
        rows, cols = spec.get("rows"), spec.get("cols")
        self.window = (int(rows), int(cols)) if rows and cols else None
        # docker run creates a missing working directory and fails on an unknown user with 125;
        # docker exec fails on both, with 126.
        self.make_cwd = not is_exec
        self.user_error_code = 126 if is_exec else 125
        self.etc_files: dict[str, str] = {} if is_exec else etc_files(spec)


def etc_files(spec: dict[str, Any]) -> dict[str, str]:
    """The files docker bind-mounts into /etc; here written into the container's writable root."""
    files = {}
    hostname = spec.get("hostname") or ""
    if hostname:
        files["/etc/hostname"] = hostname + "\n"
    hosts = spec.get("hosts")
    if hosts is None:
        hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        if hostname:
            hosts += f"127.0.1.1\t{hostname}\n"
    files["/etc/hosts"] = hosts
    if spec.get("resolv_conf") is not None:
        files["/etc/resolv.conf"] = spec["resolv_conf"]
    return files


def build_env(launch: Launch, home: str) -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH}
    if launch.hostname:
        env["HOSTNAME"] = launch.hostname
    if launch.tty:
        env["TERM"] = "xterm"
    for item in launch.env:
        key, sep, value = item.partition("=")
        if sep and key:
            env[key] = value
    env.setdefault("HOME", home)
    return env


def write_etc_file(path: str, text: str) -> None:
    # ``path`` is resolved already (chrooted, or its directory found beneath the root), so a symlink here
    # cannot lead out of the container; replace it rather than write through it, as docker's bind mount
    # would hide it.
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):  # a link, a device or a fifo planted by the image
            os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
