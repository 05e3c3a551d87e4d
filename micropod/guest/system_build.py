"""Build the guest system image: a Python runtime from Debian packages, busybox, and the agent.

The image is a read-only squashfs that the VM mounts as its root; the agent (PID 1) then assembles
the container's overlay from the other disks.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path

from micropod import proc
from micropod.errors import CommandError, MicropodError
from micropod.guest import artefacts
from micropod.guest.staging import exclusive_lock, make_dirs, pack_squashfs, scratch_dir
from micropod.paths import CacheRoot

log = logging.getLogger("micropod")

GUEST_PYTHON = "/usr/bin/python3.11"
GUEST_STDLIB = "usr/lib/python3.11"
AGENT_ROOT = "usr/lib/micropod"
INIT_PATH = "sbin/micropod-init"

# Linux hands everything after the interpreter path to it as ONE argument, so the flags must be
# written as a single option cluster ("-I -S" would reach Python as the unknown option "- ").
INIT_SCRIPT = f"""#!{GUEST_PYTHON} -IS
# PID 1 of a micropod guest: start the agent from the read-only system image.
import sys
sys.path.insert(0, "/{AGENT_ROOT}")
from micropod.agent.entry import main
main()
"""

MOUNT_POINTS = ("proc", "sys", "dev", "run", "tmp", "mnt/lower", "mnt/upper", "mnt/root", "etc", "root",
                "var")

# Never used by the agent; dropped to keep the image small and the pyc compile short.
PRUNED_PATHS = (
    "usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info", "usr/share/lintian",
    "usr/share/gdb", "usr/share/binfmts", "usr/share/applications", "usr/share/pixmaps",
    "usr/share/python3", "usr/lib/x86_64-linux-gnu/gconv", "usr/lib/x86_64-linux-gnu/audit",
    "usr/libexec", "etc/ld.so.conf.d", "var",
    *(f"{GUEST_STDLIB}/{name}" for name in (
        "test", "idlelib", "tkinter", "turtledemo", "turtle.py", "ensurepip", "lib2to3", "distutils",
        "pydoc_data", "pydoc.py", "sqlite3", "dbm", "curses", "venv", "unittest/test",
        "ctypes/test", "sqlite3/test", "__phello__", "config-3.11-x86_64-linux-gnu",
    )),
)
# Extension modules whose shared libraries the image does not ship, or that are test-only.
PRUNED_EXTENSIONS = (
    "_bz2", "_lzma", "_ssl", "_hashlib", "_sqlite3", "_dbm", "_gdbm", "_curses", "_curses_panel",
    "readline", "nis", "_crypt", "_uuid", "_decimal", "_tkinter", "audioop", "ossaudiodev",
    "_ctypes_test", "_testbuffer", "_testcapi", "_testclinic", "_testimportmultiple",
    "_testinternalcapi", "_testmultiphase", "_xxsubinterpreters", "_xxtestfuzz", "xxlimited",
    "xxlimited_35",
)
# Programs from the packages that the guest never runs; busybox provides the tools it needs.
KEPT_PROGRAMS = {"usr/bin/python3.11"}


def read_packages(path: Path) -> list[str]:
    names = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def cached_deb(downloads: Path, package: str) -> Path | None:
    candidates = sorted(downloads.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def download_packages(downloads: Path, packages: list[str]) -> list[Path]:
    """The .deb of each package, fetched with `apt-get download` unless already cached."""
    downloads.mkdir(parents=True, exist_ok=True)
    missing = [name for name in packages if cached_deb(downloads, name) is None]
    if missing:
        log.info("downloading %s", " ".join(missing))
        try:
            proc.run(["apt-get", "download", *missing], cwd=downloads, timeout=900)
        except CommandError:
            # The package lists may be stale or absent; refresh them once and retry.
            proc.run(["apt-get", "update"], timeout=900)
            proc.run(["apt-get", "download", *missing], cwd=downloads, timeout=900)
    debs = []
    for name in packages:
        deb = cached_deb(downloads, name)
        if deb is None:
            raise MicropodError(f"apt-get download {name} produced no .deb in {downloads}")
        debs.append(deb)
    return debs


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def prune(root: Path) -> None:
    for rel in PRUNED_PATHS:
        remove(root / rel)
    dynload = root / GUEST_STDLIB / "lib-dynload"
    for name in PRUNED_EXTENSIONS:
        for path in dynload.glob(f"{name}.cpython-*.so"):
            path.unlink()
    for bindir in ("bin", "sbin", "usr/bin", "usr/sbin"):
        for path in sorted((root / bindir).glob("*")):
            if path.relative_to(root).as_posix() not in KEPT_PROGRAMS:
                remove(path)
    for cache in root.rglob("__pycache__"):
        shutil.rmtree(cache)


def busybox_version() -> str:
    result = proc.run(["dpkg-query", "-W", "-f", "${Status} ${Version}", "busybox-static"], check=False)
    status = result.stdout.decode().strip()
    if result.returncode != 0 or not status.startswith("install ok installed"):
        raise MicropodError("busybox-static is not installed", hint="apt-get install busybox-static")
    return status.rsplit(" ", 1)[-1]


def install_busybox(root: Path, busybox: Path = artefacts.BUSYBOX) -> None:
    """/bin/busybox plus a symlink per applet, never replacing a file the packages installed."""
    busybox_version()  # the static build; the dynamic `busybox` package would need its own libs
    target = root / "bin/busybox"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, target)
    applets = proc.run([busybox, "--list-full"]).stdout.decode().split()
    for applet in applets:
        link = root / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")


def install_agent(root: Path) -> None:
    dest = root / AGENT_ROOT
    for source in artefacts.agent_sources():
        target = dest / source.relative_to(artefacts.SOURCE_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def install_init(root: Path) -> None:
    init = root / INIT_PATH
    init.parent.mkdir(parents=True, exist_ok=True)
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)


def guest_env(root: Path) -> dict[str, str]:
    """Run the staged guest interpreter on the host, against its own stdlib and libraries."""
    libs = ":".join(os.fspath(root / d) for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"))
    return {"PYTHONHOME": os.fspath(root / "usr"), "LD_LIBRARY_PATH": libs}


def check_magic(root: Path) -> None:
    """The pycs are compiled by the host interpreter, so its bytecode must be the guest's."""
    script = "import importlib.util; print(importlib.util.MAGIC_NUMBER.hex())"
    result = proc.run([root / GUEST_PYTHON.lstrip("/"), "-S", "-c", script], env=guest_env(root))
    guest_magic = result.stdout.decode().strip()
    host_magic = importlib.util.MAGIC_NUMBER.hex()
    if guest_magic != host_magic:
        raise MicropodError(f"guest Python bytecode magic {guest_magic} differs from the host's "
                            f"{host_magic} ({sys.executable})",
                            hint="build with a Python 3.11 interpreter")


def compile_pycs(root: Path) -> None:
    """Unchecked-hash pycs: the guest imports without stat()ing sources, and never rewrites them."""
    check_magic(root)
    proc.run([sys.executable, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash",
              "-s", root, "-p", "/", root / GUEST_STDLIB, root / AGENT_ROOT], timeout=900)


def stage_system(root: Path, debs: list[Path]) -> None:
    for deb in debs:
        proc.run(["dpkg-deb", "-x", deb, root], timeout=300)
    prune(root)
    install_busybox(root)
    install_agent(root)
    install_init(root)
    make_dirs(root, MOUNT_POINTS)
    (root / "tmp").chmod(0o1777)
    compile_pycs(root)


def build_system(cache: CacheRoot, *, force: bool = False) -> Path:
    """Build system.sqfs for the current system key, unless it already exists."""
    dest = artefacts.system_path(cache)
    if dest.is_file() and not force:
        log.info("system image up to date: %s", dest)
        return dest
    with exclusive_lock(cache.path / "guest" / ".system.lock"):
        debs = download_packages(cache.downloads, read_packages(artefacts.PACKAGES_LIST))
        with scratch_dir(cache.path / "guest", ".system-") as root:
            log.info("staging the system image in %s", root)
            stage_system(root, debs)
            return pack_squashfs(root, dest)
