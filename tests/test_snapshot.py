import os
from dataclasses import replace
from pathlib import Path

import pytest

from micropod.paths import CacheRoot
from micropod.vmm import snapshot
from micropod.vmm.base import Drive, NetInterface, VmSpec


@pytest.fixture
def spec(tmp_path: Path) -> VmSpec:
    for name, size in (("vmlinux", 10), ("system.sqfs", 20), ("image.sqfs", 30), ("upper.ext4", 4096)):
        (tmp_path / name).write_bytes(b"\0" * size)
    return VmSpec(
        vm_id="a" * 64, kernel=tmp_path / "vmlinux", cmdline="console=ttyS0", vcpus=1, memory_mib=256,
        drives=(Drive("system", tmp_path / "system.sqfs", True, True),
                Drive("rootfs", tmp_path / "image.sqfs", True),
                Drive("upper", tmp_path / "upper.ext4", False)),
        run_dir=tmp_path, console_log=tmp_path / "console.log",
    )


def key(spec: VmSpec, shape: list[str] | None = None) -> str:
    return snapshot.snapshot_key(spec, shape or ["-M", "microvm"], spec.kernel)


def test_key_ignores_the_per_vm_disks_but_not_the_machine(spec: VmSpec, tmp_path: Path) -> None:
    base = key(spec)
    other_image = tmp_path / "other.sqfs"
    other_image.write_bytes(b"x" * 999)
    assert key(replace(spec, drives=(spec.drives[0], Drive("rootfs", other_image, True), spec.drives[2]))) == base
    assert key(replace(spec, vcpus=2)) != base
    assert key(replace(spec, memory_mib=512)) != base
    assert key(replace(spec, cmdline="console=ttyS0 quiet")) != base
    assert key(spec, ["-M", "microvm", "-cpu", "host"]) != base
    (tmp_path / "upper.ext4").write_bytes(b"\0" * 8192)  # the guest keeps the writable disk's capacity
    assert key(spec) != base


def test_vms_on_other_taps_share_a_shape_but_a_nic_is_part_of_it(spec: VmSpec) -> None:
    from micropod.vmm.qemu import QemuLayout, qemu_argv

    def shape(s: VmSpec) -> list[str]:
        return qemu_argv(snapshot.machine_shape(s), Path("/qemu"), "tcg", QemuLayout(Path(".")))

    one = replace(spec, nets=(NetInterface("net0", "mp-aaaa", "02:00:00:00:00:0a"),))
    two = replace(spec, nets=(NetInterface("net0", "mp-bbbb", "02:00:00:00:00:0b"),), vm_id="b" * 64)
    assert shape(one) == shape(two)
    assert shape(one) != shape(spec)
    assert "mp-aaaa" not in " ".join(shape(one))


def test_template_gets_throwaway_taps(spec: VmSpec, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with_nic = replace(spec, nets=(NetInterface("net0", "mp-aaaa", "02:00:00:00:00:0a"),))
    taps = snapshot.template_taps(with_nic)
    assert len(taps) == 1 and len(taps[0]) <= 15
    template = snapshot.template_spec(with_nic, work, taps)
    assert template.nets == (NetInterface("net0", taps[0], snapshot.TEMPLATE_MAC),)


def test_template_uses_placeholders_except_for_the_system_image(spec: VmSpec, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    template = snapshot.template_spec(spec, work)
    system, rootfs, upper = template.drives
    assert system == spec.drives[0]
    assert rootfs.path.parent == work and rootfs.path.stat().st_size == snapshot.ROOTFS_PLACEHOLDER_SIZE
    assert rootfs.path.stat().st_blocks == 0  # sparse
    assert upper.path.stat().st_size == spec.drives[2].path.stat().st_size
    assert [d.drive_id for d in template.drives] == [d.drive_id for d in spec.drives]
    assert [d.read_only for d in template.drives] == [d.read_only for d in spec.drives]


def test_switches_and_locations(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MICROPOD_SNAPSHOTS", "0")
    assert not snapshot.enabled()
    monkeypatch.delenv("MICROPOD_SNAPSHOTS")
    assert snapshot.enabled()
    monkeypatch.setenv("MICROPOD_SNAPSHOT_DIR", str(tmp_path / "s"))
    assert snapshot.snapshot_path(CacheRoot(tmp_path), "k") == tmp_path / "s" / "k.qemu"
    snapshot.invalidate(tmp_path / "s" / "missing.qemu")
    snapshot.invalidate(None)


def test_only_the_most_recently_used_snapshots_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROPOD_SNAPSHOT_DIR", str(tmp_path / "snaps"))
    monkeypatch.setenv("MICROPOD_SNAPSHOTS_KEPT", "2")
    cache = CacheRoot(tmp_path / "cache")
    (tmp_path / "snaps").mkdir()
    for age, name in enumerate(("newest", "middle", "oldest")):
        saved = tmp_path / "snaps" / f"{name}.qemu"
        saved.write_bytes(b"s")
        used = saved.with_name(f".{saved.name}.lock")  # where its last use is kept
        used.touch()
        os.utime(used, ns=(0, (10 - age) * 10**9))
    assert [p.stem for p in snapshot.saved(cache)] == ["newest", "middle", "oldest"]
    assert [p.stem for p in snapshot.drop_least_used(cache)] == ["oldest"]
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir() if not p.name.startswith(".")) == [
        "middle.qemu", "newest.qemu"]


def test_the_snapshot_a_run_is_about_to_use_is_never_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot just saved had its lock made when its build began, so it looked older than those used
    meanwhile: it was dropped the moment it was saved (a pod then booted cold)."""
    monkeypatch.setenv("MICROPOD_SNAPSHOT_DIR", str(tmp_path / "snaps"))
    monkeypatch.setenv("MICROPOD_SNAPSHOTS_KEPT", "1")
    cache = CacheRoot(tmp_path / "cache")
    (tmp_path / "snaps").mkdir()
    for name, when in (("other", 20), ("fresh", 10)):
        (tmp_path / "snaps" / f"{name}.qemu").write_bytes(b"s")
        (tmp_path / "snaps" / f"{name}.upper").write_bytes(b"u")
        lock = tmp_path / "snaps" / f".{name}.qemu.lock"
        lock.touch()
        os.utime(lock, ns=(0, when * 10**9))
    fresh = tmp_path / "snaps" / "fresh.qemu"
    assert snapshot.drop_least_used(cache, keep=fresh) == [tmp_path / "snaps" / "other.qemu"]
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir() if not p.name.startswith(".")) == [
        "fresh.qemu", "fresh.upper"]  # a root-ready snapshot's pristine layer goes with it


def test_a_root_ready_key_follows_the_bases_bytes_not_its_path(spec: VmSpec, tmp_path: Path) -> None:
    from micropod.rootfs.upper import create_upper
    from micropod.vmm import rootsnap

    digests = tmp_path / "digests"
    fresh = rootsnap.FreshRoot("main", tmp_path / "new-upper.ext4", 1 << 30, create_upper)
    rootfs = {"lower": "/dev/vdb", "upper": "/dev/vdc"}

    def key_of(base: Path, size: int = 1 << 30) -> str:
        template = rootsnap.RootTemplate(replace(fresh, size=size), rootfs, "rootfs", base, "upper")
        return rootsnap.root_key(spec, ["-M", "microvm"], spec.kernel, template, digests)

    image = spec.drives[1].path
    same_bytes = tmp_path / "elsewhere.sqfs"
    same_bytes.write_bytes(image.read_bytes())
    first = key_of(image)
    assert key_of(same_bytes) == first  # the same image in another state root
    assert first != key(spec)  # never a plain boot snapshot's
    assert key_of(image, size=2 << 30) != first
    with image.open("ab") as f:
        f.write(b"changed")
    assert key_of(image) != first  # hashed again: its size and time changed
    assert len(list(digests.iterdir())) == 3
