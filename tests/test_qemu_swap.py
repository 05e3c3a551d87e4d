"""A running QEMU's drive pointed at another file over QMP (micropod/vmm/qemu_blocks.py swap_backing_file): how a
later container's disk reaches a VM that booted with a placeholder, QEMU microvm having no hotplug."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from micropod.errors import VmmError
from micropod.vmm.base import Drive, VmSpec
from micropod.vmm.qemu import QemuLayout, qemu_argv
from micropod.vmm.qemu_blocks import swap_backing_file
from micropod.vmm.qmp import QmpClient

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64")


def drives_only(argv: list[str]) -> list[str]:
    """Just the drives of micropod's own command line: no kernel is needed to test the block layer."""
    kept = []
    for i, word in enumerate(argv):
        if word in ("-drive", "-device") and (word == "-drive" or "virtio-blk" in argv[i + 1]):
            kept += [word, argv[i + 1]]
    return kept


def node_files(qmp: QmpClient) -> dict[str, str]:
    return {n["node-name"]: n["file"] for n in qmp.execute("query-named-block-nodes") if n["drv"] == "raw"}


def test_a_placeholder_drive_is_swapped_to_the_real_disk_and_again(tmp_path: Path) -> None:
    placeholder, first, second = tmp_path / "spare.img", tmp_path / "first.img", tmp_path / "second.img"
    for path, size in ((placeholder, 1 << 20), (first, 2 << 20), (second, 4 << 20)):
        path.write_bytes(b"")
        with path.open("r+b") as f:
            f.truncate(size)
    spec = VmSpec(vm_id="a" * 64, kernel=Path("/k"), cmdline="", vcpus=1, memory_mib=64,
                  drives=(Drive("vol0", placeholder, False),), run_dir=tmp_path, console_log=tmp_path / "c.log")
    sock = tmp_path / "qmp.sock"
    argv = [QEMU or "", "-M", "microvm", "-nodefaults", "-display", "none", "-S", "-qmp",
            f"unix:{sock},server=on,wait=off", *drives_only(qemu_argv(spec, Path("q"), "tcg", QemuLayout(tmp_path)))]
    qemu = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert qemu.poll() is None and time.monotonic() < deadline, qemu.stdout.read() if qemu.stdout else ""
            time.sleep(0.02)
        qmp = QmpClient(str(sock))
        try:
            assert node_files(qmp) == {"fmt-vol0": str(placeholder)}
            swap_backing_file(qmp, "vol0", first, read_only=False, generation=0)
            assert node_files(qmp) == {"fmt-vol0": str(first)}
            swap_backing_file(qmp, "vol0", second, read_only=False, generation=1)
            assert node_files(qmp) == {"fmt-vol0": str(second)}
            block = next(b for b in qmp.execute("query-block") if b["device"] == "vol0")
            assert block["inserted"]["image"]["virtual-size"] == 4 << 20  # the guest is told the new size
            # A drive's read-only or read-write use is fixed at boot: a pool keeps slots of each kind.
            with pytest.raises(VmmError, match="cannot support read-write users"):
                swap_backing_file(qmp, "vol0", first, read_only=True, generation=2)
            with pytest.raises(VmmError, match="QMP blockdev-add"):
                swap_backing_file(qmp, "vol0", tmp_path / "missing.img", read_only=False, generation=3)
            assert node_files(qmp) == {"fmt-vol0": str(second)}  # a failed swap leaves the drive as it was
        finally:
            qmp.close()
    finally:
        qemu.kill()
        qemu.wait(10)
