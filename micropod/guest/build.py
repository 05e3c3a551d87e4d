"""`python -m micropod.guest.build [--kernel] [--system] [--force]`: build the guest artefacts.

Idempotent: an artefact whose key already has a file is not rebuilt (unless --force). With no
flag, builds the kernel, the system image and the benchmark baseline root.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from micropod.errors import MicropodError
from micropod.guest.baseline import baseline_root, build_baseline, qemu_baseline_argv
from micropod.guest.kernel_build import build_kernel
from micropod.guest.system_build import build_system
from micropod.paths import CacheRoot

__all__ = ["baseline_root", "build_baseline", "build_kernel", "build_system", "main", "qemu_baseline_argv"]

log = logging.getLogger("micropod")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m micropod.guest.build", description=__doc__)
    parser.add_argument("--kernel", action="store_true", help="build the guest kernel (vmlinux)")
    parser.add_argument("--system", action="store_true", help="build the guest system image (system.sqfs)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the artefact exists")
    parser.add_argument("--debug", action="store_true", help="log every command run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    everything = not (args.kernel or args.system)
    cache = CacheRoot.from_env()
    try:
        if args.kernel or everything:
            _timed("kernel", lambda: build_kernel(cache, force=args.force))
        if args.system or everything:
            _timed("system image", lambda: build_system(cache, force=args.force))
        if everything:
            _timed("baseline root", lambda: build_baseline(cache, force=args.force))
    except MicropodError as exc:
        print(f"micropod: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def _timed(what: str, build: Callable[[], Path]) -> None:
    start = time.monotonic()
    path = build()
    log.info("%s: %s (%.1fs)", what, path, time.monotonic() - start)


if __name__ == "__main__":
    sys.exit(main())
