"""The agent's cp support: paths resolved within the container root, tar streams in and out, and what
the host (or anything) sends unpacked without following a link the container planted."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from micropod import wire
from micropod.agent.archive import ArchiveError, FrameWriter, extract_tar, resolve, write_tar
from micropod.agent.filecopy import FileCopy


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


def _tar(*members: tuple[str, bytes, bytes, str, int]) -> bytes:
    """A tar of (name, type, data, link name, mode) members, as the host (or anything) could send."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data, link, mode in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode, info.uid, info.gid = kind, link, mode, 1234, 5678
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return out.getvalue()


def test_nothing_is_written_beneath_a_link_the_container_planted(root: Path) -> None:
    (root / "srv" / "d").mkdir()
    (root / "srv" / "d" / "sub").symlink_to("/etc")
    tar = _tar(("d", tarfile.DIRTYPE, b"", "", 0o755), ("d/sub/passwd", tarfile.REGTYPE, b"owned\n", "", 0o644))
    with pytest.raises(ArchiveError, match="refusing to write beneath d/sub: it is a symbolic link"):
        extract_tar(str(root), "/srv", io.BytesIO(tar))
    assert (root / "etc" / "passwd").read_text() == "root\n"


def test_a_hard_link_may_only_name_a_file_of_the_same_copy(root: Path) -> None:
    tar = _tar(("h", tarfile.LNKTYPE, b"", "etc/passwd", 0o644), ("h", tarfile.REGTYPE, b"owned\n", "", 0o644))
    with pytest.raises(ArchiveError, match="refusing the hard link h"):
        extract_tar(str(root), "/", io.BytesIO(tar))
    assert (root / "etc" / "passwd").read_text() == "root\n" and (root / "etc" / "passwd").stat().st_nlink == 1
    assert not (root / "h").exists()


def test_setuid_is_dropped_devices_skipped_and_the_tars_owners_kept(root: Path) -> None:
    tar = _tar(("x", tarfile.DIRTYPE, b"", "", 0o2755), ("x/su", tarfile.REGTYPE, b"#!", "", 0o6755),
               ("x/null", tarfile.CHRTYPE, b"", "", 0o666), ("x/h", tarfile.LNKTYPE, b"", "x/su", 0o6755))
    extract_tar(str(root), "/srv", io.BytesIO(tar))
    su = (root / "srv" / "x" / "su").stat()
    assert oct(stat.S_IMODE(su.st_mode)) == "0o755" and su.st_nlink == 2
    assert oct(stat.S_IMODE((root / "srv" / "x").stat().st_mode)) == "0o755"
    assert not (root / "srv" / "x" / "null").exists()
    if os.geteuid() == 0:  # the host packs root's owners unless cp -a: the agent takes what it is sent
        assert (su.st_uid, su.st_gid) == (1234, 5678)


class _Agent:
    """Just enough of the agent for FileCopy: one container, and the control messages it sent."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sent: list[dict[str, object]] = []

    def container(self, _message: object) -> object:
        return type("C", (), {"root": str(self.root), "cid": "main"})()

    def check_sid_free(self, _sid: int) -> None:
        pass

    def send_control(self, message: dict[str, object]) -> None:
        self.sent.append(message)


def test_an_upload_is_unpacked_as_it_streams_and_reported_at_eof(root: Path) -> None:
    agent = _Agent(root)
    copies = FileCopy(agent)  # type: ignore[arg-type]
    copies.on_archive_put({"sid": 7, "path": "/srv/deep"})
    size = 4 << 20
    tar = _tar(("big", tarfile.REGTYPE, b"b" * size, "", 0o644))
    half = len(tar) // 2
    copies.on_upload(7, wire.DATA, tar[:half])
    written = list((root / "srv" / "deep").iterdir())
    assert len(written) == 1 and written[0].name.startswith(".micropod-cp-") and written[0].stat().st_size > 0
    copies.on_upload(7, wire.DATA, tar[half:])
    copies.on_upload(7, wire.EOF, b"")
    assert (root / "srv" / "deep" / "big").stat().st_size == size
    assert agent.sent == [{"op": "exit", "id": "main", "sid": 7, "code": 0}]
    assert 7 not in copies.uploads


def test_an_upload_that_fails_reports_one_message_and_leaves_no_partial_file(root: Path) -> None:
    agent = _Agent(root)
    copies = FileCopy(agent)  # type: ignore[arg-type]
    copies.on_archive_put({"sid": 3, "path": "/srv/deep"})
    tar = _tar(("ok", tarfile.REGTYPE, b"fine", "", 0o644), ("../evil", tarfile.REGTYPE, b"x", "", 0o644))
    copies.on_upload(3, wire.DATA, tar[:1000])
    copies.on_upload(3, wire.DATA, tar[1000:])
    copies.on_upload(3, wire.EOF, b"")
    [report] = agent.sent
    assert report["code"] == 1 and "refusing the archive member '../evil'" in str(report["message"])
    assert sorted(p.name for p in (root / "srv" / "deep").iterdir()) == ["ok"]
    assert not (root / "srv" / "evil").exists()
