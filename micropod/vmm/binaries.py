"""Finding VMM programs, without importing the backends (the Firecracker client pulls in httpx)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def find_program(name: str, env_var: str) -> Path | None:
    """$ENV_VAR when set (and then only it), else PATH, else /usr/local/bin where release tarballs go."""
    explicit = os.environ.get(env_var)
    candidates = [explicit] if explicit else [shutil.which(name), f"/usr/local/bin/{name}"]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return Path(candidate).absolute()
    return None


def find_qemu() -> Path | None:
    return find_program("qemu-system-x86_64", "MICROPOD_QEMU")


def find_firecracker() -> Path | None:
    return find_program("firecracker", "MICROPOD_FIRECRACKER")


def find_jailer() -> Path | None:
    return find_program("jailer", "MICROPOD_JAILER")
