"""OCI hooks: each gets the container's state as JSON on stdin and must finish within its timeout.

runc's failure rules: a failing prestart, createRuntime, createContainer, startContainer or poststart hook
fails the operation (and the container is killed); a failing poststop hook is only a warning.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from micropod.errors import OciRuntimeError
from micropod.runtime import log

HOOK_KINDS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")


def run_hooks(kind: str, hooks: Mapping[str, Sequence[Mapping[str, Any]]] | None, state: Mapping[str, Any]) -> None:
    for index, hook in enumerate((hooks or {}).get(kind) or []):
        try:
            _run(hook, state)
        except OciRuntimeError as exc:
            if kind == "poststop":
                log.warning(f"hooks.poststop[{index}]: {exc}")
                continue
            raise OciRuntimeError(f"error running {kind} hook #{index}: {exc}") from None


def _run(hook: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    import subprocess  # only containers with hooks pay for it

    path = str(hook["path"])
    args = [str(a) for a in hook.get("args") or [path]]
    env = dict(str(e).partition("=")[::2] for e in hook.get("env") or [])
    timeout = hook.get("timeout")
    try:
        done = subprocess.run(args, executable=path, input=json.dumps(state).encode(), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=float(timeout) if timeout else None, check=False)
    except subprocess.TimeoutExpired:
        raise OciRuntimeError(f"{path}: timeout after {timeout} seconds") from None
    except OSError as exc:
        raise OciRuntimeError(f"{path}: {exc.strerror}") from None
    if done.returncode != 0:
        output = done.stdout.decode(errors="replace").strip()[-500:]
        raise OciRuntimeError(f"{path}: exit status {done.returncode}{', output: ' + output if output else ''}")
