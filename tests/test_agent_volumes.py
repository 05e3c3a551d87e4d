"""The agent's side of volumes and binds (micropod/agent/volumes.py): where an image's links may lead them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from micropod import syscalls
from micropod.agent.volumes import VolumeError, _fill_on_first_use, _mount_point


@pytest.mark.parametrize("link", ["/", "/proc", "/proc/self", "/sys/kernel", "/dev", "../../dev/shm"])
def test_an_image_link_cannot_lead_a_volume_onto_the_root_or_the_kernels_filesystems(tmp_path: Path,
                                                                                      link: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "data").symlink_to(link)
    with pytest.raises(VolumeError, match="where no volume may go"):
        _mount_point(str(root), "/data", "volumes[0]")


def test_a_plain_target_resolves_beneath_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "srv").mkdir(parents=True)
    (root / "data").symlink_to("/srv/../srv/d")
    assert _mount_point(str(root), "/data", "volumes[0]") == root / "srv" / "d"


def test_the_first_fill_copies_the_image_but_no_filesystem_mounted_in_it(tmp_path: Path) -> None:
    image, volume = tmp_path / "image", tmp_path / "volume"
    (image / "etc" / "mounted").mkdir(parents=True)
    (image / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\n")
    volume.mkdir()
    (volume / "lost+found").mkdir()
    syscalls.mount("tmpfs", str(image / "etc" / "mounted"), "tmpfs", 0, "size=1m")
    try:
        (image / "etc" / "mounted" / "secret").write_text("agent's\n")
        _fill_on_first_use(str(volume), image / "etc")
    finally:
        syscalls.umount2(str(image / "etc" / "mounted"))
    assert sorted(os.listdir(volume)) == ["passwd"]  # lost+found gone, the mount left out


def test_a_fill_that_fails_is_undone_so_the_next_use_tries_again(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    image, volume = tmp_path / "image", tmp_path / "volume"
    (image / "data").mkdir(parents=True)
    (image / "data" / "a").write_text("a")
    volume.mkdir()

    def half_then_fail(src: int, dst: int) -> None:
        os.mkdir("half", dir_fd=dst)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("micropod.agent.volumes.copy_tree", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        _fill_on_first_use(str(volume), image / "data")
    assert os.listdir(volume) == []
    monkeypatch.undo()
    _fill_on_first_use(str(volume), image / "data")
    assert os.listdir(volume) == ["a"]
