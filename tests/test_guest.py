"""Guest kernel and system image: fragment parsing, cache keys, locate(), and real boots under QEMU TCG."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from micropod import proc
from micropod.errors import GuestMissingError
from micropod.guest import artefacts
from micropod.guest.baseline import QEMU_CMDLINE, ROOT_CMDLINE, baseline_root, qemu_baseline_argv
from micropod.guest.kernel_build import ConfigOption, missing_options, parse_config, parse_fragment
from micropod.guest.staging import pack_squashfs
from micropod.guest.system_build import INIT_SCRIPT, install_busybox, read_packages
from micropod.paths import CacheRoot
from micropod.vmm.base import AGENT_SERIAL_NAME

BOOT_TIMEOUT = 120.0

# ---------------------------------------------------------------------------------------------- unit


def test_parse_fragment_reads_set_and_unset_lines() -> None:
    text = "# a comment\nCONFIG_A=y\n\n# CONFIG_B is not set\nCONFIG_C=\"x y\"\nCONFIG_D=64\n"
    assert parse_fragment(text) == [
        ConfigOption("CONFIG_A", "y"), ConfigOption("CONFIG_B", "n"),
        ConfigOption("CONFIG_C", '"x y"'), ConfigOption("CONFIG_D", "64"),
    ]


def test_missing_options_names_what_kconfig_dropped() -> None:
    wanted = parse_fragment("CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_D=m\n")
    final = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_D=y\n"
    assert [o.name for o in missing_options(wanted, final)] == ["CONFIG_B", "CONFIG_D"]


def test_fragment_has_what_both_vmms_and_the_agent_need() -> None:
    config = parse_config(artefacts.KERNEL_FRAGMENT.read_text())
    required = [
        "64BIT", "PVH", "HYPERVISOR_GUEST", "PARAVIRT", "KVM_GUEST", "SMP", "X86_MPPARSE",
        "VIRTIO_MMIO", "VIRTIO_MMIO_CMDLINE_DEVICES", "VIRTIO_BLK", "VIRTIO_NET", "VSOCKETS",
        "VIRTIO_VSOCKETS", "VIRTIO_CONSOLE", "HW_RANDOM_VIRTIO", "EXT4_FS", "SQUASHFS", "SQUASHFS_ZSTD",
        "SQUASHFS_XZ", "SQUASHFS_ZLIB", "SQUASHFS_LZ4", "OVERLAY_FS", "TMPFS", "DEVTMPFS",
        "DEVTMPFS_MOUNT", "SERIAL_8250_CONSOLE", "UNIX98_PTYS", "UNIX", "INET", "IPV6", "IP_PNP",
        "BINFMT_ELF", "BINFMT_SCRIPT", "MEMCG", "CGROUP_PIDS", "CPUSETS", "BLK_CGROUP", "SECCOMP_FILTER",
        "USER_NS", "PID_NS", "NET_NS", "NO_HZ_IDLE",
    ]
    assert [name for name in required if config.get(f"CONFIG_{name}") != "y"] == []


def test_kernel_key_is_stable_and_follows_its_inputs(tmp_path: Path) -> None:
    fragment = tmp_path / "kernel.config"
    fragment.write_bytes(artefacts.KERNEL_FRAGMENT.read_bytes())
    tarball = tmp_path / "linux-source-6.1.tar.xz"
    tarball.write_bytes(b"x")
    key = artefacts.kernel_key(fragment, tarball)
    assert key == artefacts.kernel_key(fragment, tarball)
    assert len(key) == 64

    fragment.write_text(fragment.read_text() + "CONFIG_EXTRA=y\n")
    changed_fragment = artefacts.kernel_key(fragment, tarball)
    assert changed_fragment != key

    tarball.write_bytes(b"xy")
    assert artefacts.kernel_key(fragment, tarball) != changed_fragment


def test_system_key_follows_packages_busybox_and_agent_sources(tmp_path: Path) -> None:
    packages = tmp_path / "packages.txt"
    packages.write_text("python3.11-minimal\n")
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"bb")
    source = tmp_path / "main.py"
    source.write_text("def main(): pass\n")

    def key() -> str:
        return artefacts.system_key(packages, busybox, [source])

    first = key()
    assert first == key()
    source.write_text("def main(): return 1\n")
    second = key()
    assert second != first
    packages.write_text("python3.11-minimal\nlibffi8\n")
    third = key()
    assert third != second
    busybox.write_bytes(b"bigger")
    assert key() != third


def test_agent_sources_include_the_package_and_agent_modules() -> None:
    names = {p.relative_to(artefacts.SOURCE_ROOT).as_posix() for p in artefacts.agent_sources()}
    assert {"micropod/__init__.py", "micropod/agent/__init__.py"} <= names
    assert all(name.startswith("micropod/") for name in names)
    assert all(name.endswith(".py") or name.startswith("micropod/runtime/") for name in names)
    assert "micropod/runtime/seccomp_default.json" in names


def test_keys_are_cheap_to_compute() -> None:
    start = time.perf_counter()
    for _ in range(20):
        artefacts.kernel_key()
        artefacts.system_key()
    assert (time.perf_counter() - start) / 20 < 0.02


def test_locate_raises_with_a_build_hint_when_missing(tmp_path: Path) -> None:
    with pytest.raises(GuestMissingError) as info:
        artefacts.locate(CacheRoot(tmp_path))
    assert info.value.hint == "run 'make guest' (see 'micropod doctor')"
    assert "vmlinux" in str(info.value)


def test_locate_returns_the_keyed_paths_once_built(tmp_path: Path) -> None:
    cache = CacheRoot(tmp_path)
    for path in (artefacts.kernel_path(cache), artefacts.system_path(cache)):
        path.parent.mkdir(parents=True)
        path.touch()
    found = artefacts.locate(cache)
    assert found.kernel == cache.guest(artefacts.kernel_key()) / "vmlinux"
    assert found.system == cache.guest(artefacts.system_key()) / "system.sqfs"


def test_read_packages_skips_comments_and_blanks(tmp_path: Path) -> None:
    listing = tmp_path / "packages.txt"
    listing.write_text("# runtime\npython3.11-minimal\n\nlibffi8  # ctypes\n")
    assert read_packages(listing) == ["python3.11-minimal", "libffi8"]
    assert "libffi8" in read_packages(artefacts.PACKAGES_LIST)


def test_init_shebang_is_one_option_cluster() -> None:
    # Linux passes everything after the interpreter as a single argument.
    shebang = INIT_SCRIPT.splitlines()[0]
    interpreter, *rest = shebang.removeprefix("#!").split(" ")
    assert interpreter == "/usr/bin/python3.11"
    assert rest == ["-IS"]


def test_baseline_argv_exits_qemu_on_guest_reboot() -> None:
    argv = qemu_baseline_argv(Path("/k/vmlinux"), Path("/r/baseline.sqfs"))
    assert "-no-reboot" in argv
    assert argv[argv.index("-accel") + 1] == "tcg"
    cmdline = argv[argv.index("-append") + 1]
    assert "reboot=t" in cmdline and "panic=-1" in cmdline and "root=/dev/vda" in cmdline


# ----------------------------------------------------------------------------------------------- e2e


def _kernel() -> Path:
    kernel = artefacts.kernel_path(CacheRoot.from_env())
    if not kernel.is_file():
        pytest.skip(f"guest kernel not built ({kernel}); run 'make guest'")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed")
    return kernel


def _system() -> Path:
    system = artefacts.system_path(CacheRoot.from_env())
    if not system.is_file():
        pytest.skip(f"guest system image not built ({system}); run 'make guest'")
    return system


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


class Qemu:
    """A QEMU child whose console goes to a file; every wait is bounded and shows the console tail."""

    def __init__(self, argv: list[str], console: Path) -> None:
        self.console = console
        self._console_file = console.open("wb")
        self.process = proc.spawn(argv, stdout=self._console_file, stderr=subprocess.STDOUT)

    def wait_exit(self, timeout: float = BOOT_TIMEOUT) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"QEMU still running after {timeout}s; console tail:\n{_tail(self.console)}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._console_file.close()


@pytest.fixture
def qemus() -> Iterator[list[Qemu]]:
    started: list[Qemu] = []
    yield started
    for qemu in started:
        qemu.close()


def _boot(qemus: list[Qemu], argv: list[str], console: Path) -> Qemu:
    qemu = Qemu(argv, console)
    qemus.append(qemu)
    return qemu


def _with_cmdline(argv: list[str], cmdline: str) -> list[str]:
    argv = list(argv)
    argv[argv.index("-append") + 1] = cmdline
    return argv


@pytest.mark.e2e
def test_baseline_root_powers_off_and_qemu_exits(tmp_path: Path, qemus: list[Qemu]) -> None:
    kernel = _kernel()
    qemu = _boot(qemus, qemu_baseline_argv(kernel, baseline_root(), quiet=False), tmp_path / "console.log")
    assert qemu.wait_exit() == 0, _tail(qemu.console)
    assert "reboot: Restarting system" in qemu.console.read_text(errors="replace"), _tail(qemu.console)


STAND_IN_INIT = f"""#!/bin/sh
mount -t sysfs sysfs /sys
for port in /sys/class/virtio-ports/*; do
    [ "$(cat "$port/name")" = "{AGENT_SERIAL_NAME}" ] && dev="/dev/${{port##*/}}"
done
echo "stand-in init found $dev"
echo "hello from the guest on $dev" > "$dev"
exec reboot -f
"""


def _stand_in_root(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    install_busybox(tree)
    for name in ("dev", "proc", "sys"):
        (tree / name).mkdir()
    init = tree / "sbin/init"
    init.unlink()
    init.write_text(STAND_IN_INIT)
    init.chmod(0o755)
    return pack_squashfs(tree, tmp_path / "standin.sqfs")


def _connect_unix(path: Path, qemu: Qemu, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        if qemu.process.poll() is not None:
            pytest.fail(f"QEMU exited with {qemu.process.returncode}:\n{_tail(qemu.console)}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.fspath(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                pytest.fail(f"no socket at {path} after {timeout}s:\n{_tail(qemu.console)}")
            time.sleep(0.02)


def _read_until(sock: socket.socket, marker: bytes, qemu: Qemu, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    received = b""
    while marker not in received:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"got {received!r}, no {marker!r} after {timeout}s:\n{_tail(qemu.console)}")
        sock.settimeout(min(remaining, 1.0))
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        if not chunk:
            pytest.fail(f"channel closed after {received!r}:\n{_tail(qemu.console)}")
        received += chunk
    return received


@pytest.mark.e2e
def test_stand_in_init_talks_over_the_named_virtio_serial_port(tmp_path: Path, qemus: list[Qemu]) -> None:
    kernel = _kernel()
    agent_sock = tmp_path / "agent.sock"
    argv = [
        *qemu_baseline_argv(kernel, _stand_in_root(tmp_path), quiet=False),
        # wait=on: QEMU starts the guest only once the host end is connected, so nothing is lost.
        "-chardev", f"socket,id=agent,path={agent_sock},server=on,wait=on",
        "-device", "virtio-serial-device",
        "-device", f"virtserialport,chardev=agent,name={AGENT_SERIAL_NAME}",
    ]
    qemu = _boot(qemus, argv, tmp_path / "console.log")
    with _connect_unix(agent_sock, qemu, timeout=30) as sock:
        received = _read_until(sock, b"hello from the guest", qemu, timeout=BOOT_TIMEOUT)
    assert b"/dev/vport" in received
    assert qemu.wait_exit() == 0


GUEST_PY_CHECK = """#!/usr/bin/python3.11 -IS
import ctypes, errno, fcntl, json, os, pty, select, selectors, signal, socket, struct, sys, termios, time
with open("/proc/uptime") as uptime:
    print("GUEST-PY-OK", sys.version_info[:2], json.__spec__.cached, "uptime", uptime.read().split()[0])
ctypes.CDLL(None, use_errno=True).reboot(0x01234567)  # LINUX_REBOOT_CMD_RESTART
"""


@pytest.mark.e2e
def test_guest_python_imports_what_the_agent_needs(tmp_path: Path, qemus: list[Qemu]) -> None:
    kernel, system = _kernel(), _system()
    tree = tmp_path / "check"
    tree.mkdir()
    (tree / "check").write_text(GUEST_PY_CHECK)
    (tree / "check").chmod(0o755)
    check = pack_squashfs(tree, tmp_path / "check.sqfs")
    # QEMU appends its virtio_mmio.device= options after ours, so no "--" here (it would hand them to
    # init), and the kernel drops unknown words containing a dot, so the init command has none.
    init = 'init=/bin/sh -c "mount -t proc proc /proc && mount -t squashfs /dev/vdb /mnt/lower && ' \
        'exec /mnt/lower/check"'
    argv = _with_cmdline(qemu_baseline_argv(kernel, system), f"{QEMU_CMDLINE} {ROOT_CMDLINE} {init}")
    argv += ["-drive", f"id=check,file={check},format=raw,if=none,readonly=on",
             "-device", "virtio-blk-device,drive=check", "-device", "virtio-rng-device"]
    qemu = _boot(qemus, argv, tmp_path / "console.log")
    assert qemu.wait_exit() == 0, _tail(qemu.console)
    console = qemu.console.read_text(errors="replace")
    assert "GUEST-PY-OK (3, 11) /usr/lib/python3.11/json/__pycache__" in console, _tail(qemu.console)


@pytest.mark.e2e
def test_system_image_has_the_init_and_mount_points(tmp_path: Path) -> None:
    system = _system()
    tree = tmp_path / "tree"
    tree.mkdir()
    proc.run(["rdsquashfs", "--quiet", "--chmod", "--chown", "--unpack-path", "/",
              "--unpack-root", tree, system])
    init = tree / "sbin/micropod-init"
    assert init.read_text().startswith("#!/usr/bin/python3.11 -IS\n")
    assert os.access(init, os.X_OK)
    for name in ("proc", "sys", "dev", "run", "tmp", "mnt/lower", "mnt/upper", "mnt/root", "etc", "root",
                 "var"):
        assert (tree / name).is_dir(), name
    assert (tree / "bin/busybox").is_file() and os.readlink(tree / "bin/sh") == "/bin/busybox"
    assert (tree / "usr/lib/micropod/micropod/agent/__init__.py").is_file()
    assert list((tree / "usr/lib/micropod/micropod/agent/__pycache__").glob("*.cpython-311.pyc"))
    pyc = tree / "usr/lib/python3.11/__pycache__/os.cpython-311.pyc"
    # PEP 552 flags: 0b01 = hash-based and unchecked, so the guest never stats the source.
    assert int.from_bytes(pyc.read_bytes()[4:8], "little") == 0b01
