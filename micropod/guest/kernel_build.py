"""Build the guest kernel: Debian's linux-source-6.1, `make tinyconfig`, our fragment, vmlinux."""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from micropod import proc
from micropod.errors import MicropodError
from micropod.guest import artefacts
from micropod.guest.staging import copy_atomically, exclusive_lock, scratch_dir
from micropod.paths import CacheRoot

log = logging.getLogger("micropod")

ARCH = "x86_64"
BUILD_TIMEOUT = 3 * 3600
_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")
_EXTRACTED_MARKER = ".micropod-extracted"


@dataclass(frozen=True)
class ConfigOption:
    name: str
    value: str  # "n" for "# CONFIG_X is not set"

    def satisfied_by(self, config: dict[str, str]) -> bool:
        return config.get(self.name, "n") == self.value


def parse_config(text: str) -> dict[str, str]:
    """Kconfig lines as {name: value}; explicit "is not set" lines map to "n"."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if match := _SET.match(line):
            options[match[1]] = match[2]
        elif match := _UNSET.match(line):
            options[match[1]] = "n"
    return options


def parse_fragment(text: str) -> list[ConfigOption]:
    return [ConfigOption(name, value) for name, value in parse_config(text).items()]


def missing_options(fragment: list[ConfigOption], final_config: str) -> list[ConfigOption]:
    """Fragment options the final .config does not have (Kconfig silently drops unmet ones)."""
    config = parse_config(final_config)
    return [option for option in fragment if not option.satisfied_by(config)]


@dataclass(frozen=True)
class KernelTree:
    """The extracted source and the out-of-tree build directory under CacheRoot.kernel_src."""

    cache: CacheRoot
    tarball: Path

    @property
    def source(self) -> Path:
        return self.cache.kernel_src / self.tarball.name.removesuffix(".tar.xz")

    @property
    def build(self) -> Path:
        return self.cache.kernel_src / f"build-{self.source.name}"

    @property
    def lock(self) -> Path:
        return self.cache.kernel_src / ".lock"

    def make(self, *targets: str, jobs: int = 1) -> None:
        proc.run(["make", "-s", "-C", self.source, f"O={self.build}", f"ARCH={ARCH}", f"-j{jobs}", *targets],
                 timeout=BUILD_TIMEOUT)


def extract_source(tree: KernelTree) -> None:
    """Unpack the tarball once; a marker tells a complete extraction from an interrupted one."""
    if (tree.source / _EXTRACTED_MARKER).exists():
        return
    if not tree.tarball.exists():
        raise MicropodError(f"kernel source {tree.tarball} not found",
                            hint="apt-get install linux-source-6.1")
    shutil.rmtree(tree.source, ignore_errors=True)
    with scratch_dir(tree.cache.kernel_src, ".extract-") as scratch:
        log.info("extracting %s", tree.tarball)
        proc.run(["tar", "-xf", tree.tarball, "-C", scratch], timeout=BUILD_TIMEOUT)
        extracted = scratch / tree.source.name
        if not extracted.is_dir():
            raise MicropodError(f"{tree.tarball} did not contain {tree.source.name}/")
        (extracted / _EXTRACTED_MARKER).touch()
        os.replace(extracted, tree.source)


def configure(tree: KernelTree, fragment: Path) -> None:
    tree.build.mkdir(parents=True, exist_ok=True)
    tree.make("tinyconfig")
    proc.run([tree.source / "scripts/kconfig/merge_config.sh", "-m", "-O", tree.build,
              tree.build / ".config", fragment], cwd=tree.source, timeout=600)
    tree.make("olddefconfig")
    wanted = parse_fragment(fragment.read_text())
    missing = missing_options(wanted, (tree.build / ".config").read_text())
    if missing:
        names = ", ".join(f"{option.name}={option.value}" for option in missing)
        raise MicropodError(f"kernel config lacks options of {fragment.name}: {names}",
                            hint="enable their parent menus or dependencies in the fragment")


def build_kernel(cache: CacheRoot, *, force: bool = False) -> Path:
    """Build vmlinux for the current kernel key, unless it already exists."""
    dest = artefacts.kernel_path(cache)
    if dest.is_file() and not force:
        log.info("kernel up to date: %s", dest)
        return dest
    tree = KernelTree(cache, artefacts.LINUX_SOURCE_TARBALL)
    with exclusive_lock(tree.lock):
        extract_source(tree)
        configure(tree, artefacts.KERNEL_FRAGMENT)
        log.info("building %s (this takes minutes)", dest)
        tree.make("vmlinux", jobs=len(os.sched_getaffinity(0)))
        return copy_atomically(tree.build / "vmlinux", dest)
