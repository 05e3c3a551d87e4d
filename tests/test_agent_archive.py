"""The agent's cp support: paths resolved within the container root, tar streams in and out."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from micropod.agent.archive import ArchiveError, FrameWriter, extract_tar, resolve, write_tar


@pytest.fixture
def root(tmp_path: Path) -> Path:
    base = tmp_path / "root"
    (base / "etc").mkdir(parents=True)
    (base / "etc" / "passwd").write_text("root\n")
    (base / "srv" / "deep").mkdir(parents=True)
    (base / "srv" / "abs").symlink_to("/etc")
    (base / "srv" / "rel").symlink_to("../etc")
    (base / "srv" / "escape").symlink_to("../../../etc")
    (base / "srv" / "loop").symlink_to("loop")
    return base


def test_links_resolve_inside_the_root(root: Path) -> None:
    r = str(root)
    assert resolve(r, "/etc/passwd") == f"{r}/etc/passwd"
    assert resolve(r, "/srv/abs/passwd") == f"{r}/etc/passwd"
    assert resolve(r, "/srv/rel/passwd") == f"{r}/etc/passwd"
    assert resolve(r, "/../../etc/passwd") == f"{r}/etc/passwd"  # the path's own .. stops at /
    assert resolve(r, "/srv/abs", follow_last=False) == f"{r}/srv/abs"
    assert resolve(r, "/") == r
    with pytest.raises(ArchiveError, match="outside the container"):
        resolve(r, "/srv/escape/passwd")
    with pytest.raises(ArchiveError, match="too many levels"):
        resolve(r, "/srv/loop/x")


def test_round_trip_with_rename_and_refusals(root: Path, tmp_path: Path) -> None:
    chunks: list[bytes] = []
    write_tar(str(root), "/etc", FrameWriter(chunks.append))
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
        assert sorted(tar.getnames()) == ["etc", "etc/passwd"]
    extract_tar(str(root), "/srv/deep", io.BytesIO(b"".join(chunks)), rename_top="copy")
    assert (root / "srv" / "deep" / "copy" / "passwd").read_text() == "root\n"
    extract_tar(str(root), "/srv/abs", io.BytesIO(b"".join(chunks)))  # through a link, still inside
    assert (root / "etc" / "etc" / "passwd").exists()
    with pytest.raises(ArchiveError):
        extract_tar(str(root), "/srv/escape", io.BytesIO(b"".join(chunks)))
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        info = tarfile.TarInfo("../evil")
        tar.addfile(info, io.BytesIO(b""))
    evil.seek(0)
    with pytest.raises(ArchiveError, match="refusing"):
        extract_tar(str(root), "/", evil)
    assert not (tmp_path / "evil").exists() and not os.path.exists(root.parent / "evil")
    with pytest.raises(ArchiveError, match="Could not find"):
        write_tar(str(root), "/nope", FrameWriter(chunks.append))
