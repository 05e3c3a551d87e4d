"""Named volumes (micropod/volumes.py, micropod/cli/volumes.py): real ext4 images, docker's rules."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from micropod.errors import ConflictError, NotFoundError, UsageError
from micropod.volumes import VolumeStore

VM_A, VM_B = "a" * 64, "b" * 64


@pytest.fixture
def store(tmp_path: Path) -> VolumeStore:
    return VolumeStore(tmp_path / "volumes", tmp_path / "state.db")


def test_a_volume_is_a_private_sparse_ext4_and_create_is_idempotent(store: VolumeStore, tmp_path: Path) -> None:
    made = store.create("data", size=64 << 20, labels={"team": "db"})
    again = store.create("data")
    assert again == made and made.labels == {"team": "db"}
    probe = subprocess.run(["blkid", "-o", "value", "-s", "TYPE", str(made.path)], capture_output=True, text=True)
    assert probe.stdout.strip() == "ext4"
    assert made.path.stat().st_size == 64 << 20 and made.path.stat().st_blocks * 512 < 8 << 20
    assert stat.S_IMODE(made.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(made.path.parent.stat().st_mode) == 0o700


@pytest.mark.parametrize("name", ["a", "-x", "a/b", "..", "a b", "é"])
def test_invalid_names_are_refused(store: VolumeStore, name: str) -> None:
    with pytest.raises(UsageError, match="invalid volume name"):
        store.create(name)


def test_a_volume_named_by_a_container_cannot_be_removed(store: VolumeStore) -> None:
    store.create("data", size=16 << 20)
    store.use("data", VM_A)
    with pytest.raises(ConflictError, match=r"remove data: volume is in use - \[aaaaaaaaaaaa\]"):
        store.remove("data")
    store.release_all(VM_A)
    assert store.remove("data")
    assert not (store.root / "data").exists()
    with pytest.raises(NotFoundError, match="no such volume: data"):
        store.remove("data")
    assert store.remove("data", force=True) is False


def test_a_volume_is_attached_to_one_vm_at_a_time(store: VolumeStore) -> None:
    store.create("data", size=16 << 20)
    assert store.attach("data", VM_A).holder == VM_A
    assert store.attach("data", VM_A).holder == VM_A  # again by the same VM: a restart
    with pytest.raises(ConflictError, match="volume data is attached to container aaaaaaaaaaaa: a volume is "
                                            "attached to one running VM at a time"):
        store.attach("data", VM_B)
    with pytest.raises(ConflictError):
        store.remove("data")
    store.detach("data", VM_A)
    assert store.attach("data", VM_B).holder == VM_B


def test_prune_takes_unused_anonymous_volumes_and_named_ones_only_when_asked(store: VolumeStore) -> None:
    anonymous = store.create(size=16 << 20)
    store.create("named", size=16 << 20)
    store.create("used", size=16 << 20)
    store.use("used", VM_A)
    assert len(anonymous.name) == 64
    assert store.prune() == [anonymous.name]
    assert store.prune(include_named=True) == ["named"]
    assert [v.name for v in store.all()] == ["used"]


def test_a_directory_left_by_a_crashed_create_is_reclaimed(store: VolumeStore) -> None:
    (store.root / "data").mkdir(parents=True)
    (store.root / "data" / "volume.ext4").write_bytes(b"half")
    assert store.create("data", size=16 << 20).path.stat().st_size == 16 << 20


def test_the_cli_gives_one_line_for_bad_input(tmp_path: Path) -> None:
    def micropod(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "micropod", "--root", str(tmp_path / "root"), *args],
                              capture_output=True, text=True, timeout=60)

    assert micropod("volume", "create", "-o", "size=32m", "data").stdout == "data\n"
    assert micropod("volume", "ls", "-q").stdout == "data\n"
    for args, message in ((("volume", "create", "bad/name"), 'invalid volume name "bad/name"'),
                          (("volume", "create", "-o", "type=nfs", "x1"), "unknown volume option 'type'"),
                          (("volume", "rm", "nosuch"), "no such volume: nosuch"),
                          (("volume", "inspect", "nosuch"), "no such volume: nosuch")):
        done = micropod(*args)
        assert done.returncode != 0 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert micropod("volume", "rm", "data").stdout == "data\n"


@pytest.mark.parametrize(("text", "expected"), [
    ("data:/data", ("data", "/data", False)),
    ("data:/srv/x/../d/:ro", ("data", "/srv/d", True)),
    ("data:/data:rw", ("data", "/data", False)),
])
def test_dash_v_names_a_volume_a_path_and_a_mode(text: str, expected: tuple[str, str, bool]) -> None:
    from micropod.cli.mounts import parse_volume

    parsed = parse_volume(text)
    assert (parsed.name, parsed.target, parsed.read_only) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("type=volume,source=data,target=/data", ("data", "/data", False)),
    ("src=data,dst=/data,readonly", ("data", "/data", True)),
    ("type=volume,source=data,destination=/d,readonly=false", ("data", "/d", False)),
])
def test_mount_takes_dockers_keys(text: str, expected: tuple[str, str, bool]) -> None:
    from micropod.cli.mounts import parse_mount

    parsed = parse_mount(text)
    assert (parsed.name, parsed.target, parsed.read_only) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("type=bind,source=etc,target=/x", "a bind's source must be an absolute host path"),
    ("type=tmpfs,target=/x", "type 'tmpfs' is not supported \\(volume and bind are\\)"),
    ("source=data", "it needs source=NAME and target=/path"),
    ("source=data,target=/x,colour=red", "unknown field 'colour'"),
    ("source=data,target=/", "cannot be mounted over the container's root"),
])
def test_bad_mounts_are_refused(text: str, message: str) -> None:
    from micropod.cli.mounts import parse_mount

    with pytest.raises(UsageError, match=message):
        parse_mount(text)


def test_tmpfs_options_are_checked_and_come_after_dockers_defaults() -> None:
    from micropod.agent.bundle import tmpfs_mounts
    from micropod.cli.mounts import parse_tmpfs

    parsed = parse_tmpfs("/run/x/../cache:size=64m,exec,mode=1777")
    assert (parsed.target, parsed.options) == ("/run/cache", ("size=64m", "exec", "mode=1777"))
    mount = tmpfs_mounts([{"target": parsed.target, "options": list(parsed.options)}])[0]
    assert mount["options"] == ["rw", "noexec", "nosuid", "nodev", "size=64m", "exec", "mode=1777"]
    for bad, message in (("/x:size=1m;rm", "is not a tmpfs mount option"), ("x", "must be absolute"),
                         ("/", "over the container's root")):
        with pytest.raises(UsageError, match=message):
            parse_tmpfs(bad)


def test_binds_are_qemu_shares_with_mapped_xattr_and_firecracker_refuses_them(tmp_path: Path) -> None:
    from micropod.cli.mounts import parse_mount, parse_volume
    from micropod.runconfig import BindMount
    from micropod.service.admission import resolved_binds
    from micropod.vmm.base import Share
    from micropod.vmm.qemu import QemuLayout, qemu_argv
    from tests.test_qemu import spec as make_spec

    assert parse_volume("/srv/a,b:/x:ro") == BindMount("/srv/a,b", "/x", True)
    assert parse_mount("type=bind,src=/srv,dst=/x") == BindMount("/srv", "/x", False)
    spec = make_spec(tmp_path)
    spec = type(spec)(**{**spec.__dict__, "shares": (Share("bind0", Path("/srv/a,b"), True),)})
    argv = qemu_argv(spec, Path("/usr/bin/qemu-system-x86_64"), "tcg", QemuLayout(tmp_path))
    assert "local,id=bind0,path=/srv/a,,b,security_model=mapped-xattr,readonly=on" in argv
    assert "virtio-9p-device,fsdev=bind0,mount_tag=bind0" in argv
    with pytest.raises(UsageError, match="bind mounts of host directories need QEMU: firecracker"):
        resolved_binds((BindMount(str(tmp_path), "/x"),), "firecracker")
    with pytest.raises(UsageError, match="bind source path does not exist"):
        resolved_binds((BindMount(str(tmp_path / "missing"), "/x"),), "qemu")
