"""Where the built guest kernel and system image live, keyed by the hash of their inputs.

``locate()`` runs on every ``micropod run``, so computing a key only reads a few small files and
stats two large ones (the kernel tarball, busybox): no subprocess, no walk of big trees.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from micropod.errors import GuestMissingError
from micropod.paths import CacheRoot

# Bump when the way an artefact is built changes but its input files do not.
KERNEL_RECIPE_VERSION = "1"
SYSTEM_RECIPE_VERSION = "2"
BASELINE_RECIPE_VERSION = "2"

GUEST_DIR = Path(__file__).resolve().parent
PACKAGE_DIR = GUEST_DIR.parent
SOURCE_ROOT = PACKAGE_DIR.parent
KERNEL_FRAGMENT = GUEST_DIR / "kernel.config"
PACKAGES_LIST = GUEST_DIR / "packages.txt"
LINUX_SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
BUSYBOX = Path("/bin/busybox")

# The build recipes are inputs too: a change to how an artefact is made must rebuild it.
KERNEL_RECIPE = (GUEST_DIR / "kernel_build.py",)
SYSTEM_RECIPE = (GUEST_DIR / "system_build.py", GUEST_DIR / "staging.py")
BASELINE_RECIPE = (GUEST_DIR / "baseline.py", GUEST_DIR / "staging.py")

KERNEL_NAME = "vmlinux"
SYSTEM_NAME = "system.sqfs"
BASELINE_NAME = "baseline.sqfs"
BUILD_HINT = "run 'make guest' (see 'micropod doctor')"


@dataclass(frozen=True)
class GuestArtefacts:
    kernel: Path
    system: Path


def agent_sources() -> list[Path]:
    """The package files the guest runs: copied into the system image, and part of its key."""
    sources = [PACKAGE_DIR / name for name in ("__init__.py", "syscalls.py", "netlink.py", "errors.py", "wire.py")]
    sources.extend(sorted((PACKAGE_DIR / "agent").glob("*.py")))
    # micropod-runtime runs every container in the guest; its seccomp profile is data it reads.
    sources.extend(sorted((PACKAGE_DIR / "runtime").glob("*.py")))
    sources.extend(sorted((PACKAGE_DIR / "runtime").glob("*.json")))
    return sources


def _file_identity(path: Path) -> str:
    """A large input named by its path, size and mtime: cheap, and changes when the package does."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path}:missing"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _recipe(files: Iterable[Path]) -> list[tuple[str, bytes]]:
    return [(f"recipe:{path.name}", path.read_bytes()) for path in files]


def _digest(parts: Iterable[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in parts:
        # Length-prefixed so that moving bytes between two parts cannot give the same hash.
        for chunk in (name.encode(), data):
            h.update(len(chunk).to_bytes(8, "big"))
            h.update(chunk)
    return h.hexdigest()


def kernel_key(
    fragment: Path = KERNEL_FRAGMENT, tarball: Path = LINUX_SOURCE_TARBALL
) -> str:
    return _digest([
        ("recipe", KERNEL_RECIPE_VERSION.encode()),
        *_recipe(KERNEL_RECIPE),
        ("fragment", fragment.read_bytes()),
        ("linux-source", _file_identity(tarball).encode()),
    ])


def system_key(
    packages: Path = PACKAGES_LIST, busybox: Path = BUSYBOX, sources: Iterable[Path] | None = None
) -> str:
    files = agent_sources() if sources is None else list(sources)
    parts = [
        ("recipe", SYSTEM_RECIPE_VERSION.encode()),
        *_recipe(SYSTEM_RECIPE),
        ("packages", packages.read_bytes()),
        ("busybox", _file_identity(busybox).encode()),
    ]
    parts.extend((f"source:{_relative(path)}", path.read_bytes()) for path in files)
    return _digest(parts)


def baseline_key(busybox: Path = BUSYBOX) -> str:
    return _digest([
        ("recipe", BASELINE_RECIPE_VERSION.encode()),
        *_recipe(BASELINE_RECIPE),
        ("busybox", _file_identity(busybox).encode()),
    ])


def _relative(path: Path) -> str:
    try:
        return os.fspath(path.relative_to(SOURCE_ROOT))
    except ValueError:
        return path.name


def kernel_path(cache: CacheRoot) -> Path:
    return cache.guest(kernel_key()) / KERNEL_NAME


def system_path(cache: CacheRoot) -> Path:
    return cache.guest(system_key()) / SYSTEM_NAME


def baseline_path(cache: CacheRoot) -> Path:
    return cache.guest(baseline_key()) / BASELINE_NAME


def locate(cache: CacheRoot | None = None) -> GuestArtefacts:
    """The built kernel and system image for the current inputs; GuestMissingError if not built.

    MICROPOD_KERNEL and MICROPOD_SYSTEM_IMAGE point at other artefacts (a custom guest, or a broken
    one in the tests that check how a failed boot is reported).
    """
    cache = cache or CacheRoot.from_env()
    kernel = os.environ.get("MICROPOD_KERNEL")
    system = os.environ.get("MICROPOD_SYSTEM_IMAGE")
    artefacts = GuestArtefacts(kernel=Path(kernel) if kernel else kernel_path(cache),
                               system=Path(system) if system else system_path(cache))
    missing = [path for path in (artefacts.kernel, artefacts.system) if not path.is_file()]
    if missing:
        names = ", ".join(os.fspath(path) for path in missing)
        raise GuestMissingError(f"guest artefacts not built: {names}", hint=BUILD_HINT)
    return artefacts
