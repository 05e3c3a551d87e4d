"""What one `run` asked for, resolved against the image config with docker's rules, as plain data.

The CLI writes it to the VM's config.json; the monitor reads it back and acts on it.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from micropod.errors import UsageError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ContainerSpec:
    """The process the agent starts; field names are the agent protocol's spec keys."""

    args: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str = "/"
    user: str = ""
    hostname: str = ""
    tty: bool = False
    stdin: bool = False

    def to_agent(self, rootfs: dict[str, str]) -> dict[str, Any]:
        spec = asdict(self)
        spec["args"] = list(self.args)
        spec["env"] = list(self.env)
        spec["rootfs"] = rootfs
        return spec


@dataclass(frozen=True)
class RunConfig:
    vm_id: str
    name: str
    image: str
    image_id: str
    backend: str
    kernel: str
    system: str
    rootfs: str
    vcpus: int
    memory_mib: int
    container: ContainerSpec
    auto_remove: bool = False
    stop_signal: int = int(signal.SIGTERM)
    boot_timeout: float = 60.0
    upper_size: int = 10 << 30
    labels: dict[str, str] = field(default_factory=dict)

    def dump(self, path: Path) -> None:
        """Write atomically: a reader never sees half a config."""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        raw = json.loads(path.read_text())
        container = raw.pop("container")
        container["args"] = tuple(container["args"])
        container["env"] = tuple(container["env"])
        return cls(container=ContainerSpec(**container), **raw)


def merge_command(
    entrypoint: tuple[str, ...],
    cmd: tuple[str, ...],
    override_entrypoint: str | None,
    args: tuple[str, ...],
) -> tuple[str, ...]:
    """docker's rule: --entrypoint replaces the entrypoint and drops the image's Cmd."""
    if override_entrypoint is not None:
        entrypoint = (override_entrypoint,) if override_entrypoint else ()
        cmd = ()
    if args:
        cmd = args
    command = entrypoint + cmd
    if not command:
        raise UsageError("no command specified: the image has no Entrypoint or Cmd; give one")
    return command


def parse_env_file(path: Path) -> list[str]:
    """docker's --env-file: KEY=VALUE lines, '#' comments, a bare KEY takes the host's value."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"--env-file {path}: {exc.strerror}") from exc
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def merge_env(image_env: tuple[str, ...], overrides: list[str], hostname: str) -> tuple[str, ...]:
    env: dict[str, str] = {}
    for item in image_env:
        key, _, value = item.partition("=")
        env[key] = value
    for item in overrides:
        key, sep, value = item.partition("=")
        if not key or any(c.isspace() for c in key):
            raise UsageError(f"invalid environment variable {item!r}: use KEY=VALUE")
        if sep:
            env[key] = value
        elif key in os.environ:
            env[key] = os.environ[key]
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOSTNAME", hostname)
    return tuple(f"{k}={v}" for k, v in env.items())


def parse_signal(name: str | None, default: int = int(signal.SIGTERM)) -> int:
    """A signal given as 'SIGTERM', 'TERM' or '15'."""
    if not name:
        return default
    text = name.strip().upper()
    if text.isdigit():
        number = int(text)
        if 0 < number < signal.NSIG:
            return number
    else:
        text = text if text.startswith("SIG") else f"SIG{text}"
        if text in signal.Signals.__members__:
            return int(signal.Signals[text])
    raise UsageError(f"invalid signal {name!r}")
