"""`cp` out of a container: a hostile guest's tar, unpacked by the host beneath the destination.

Each test crafts the tar a guest could send and runs micropod.cli.copy.copy_out over a fake monitor
client that delivers it in frames, as the real one does.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from micropod.cli import copy
from micropod.errors import MicropodError

FRAME = 4096  # smaller than the real frames, so that headers and data are split across them


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644, link: str = "",
           uid: int = 0, gid: int = 0) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.uid, info.gid = kind, mode, link, uid, gid
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mtime = 1_600_000_000
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3
    return info, data


def directory(name: str, mode: int = 0o755) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.DIRTYPE, mode=mode)


def tar_of(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def frames(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), FRAME):
        yield data[i:i + FRAME]


class FakeClient:
    """A monitor client whose cp-get session sends ``chunks`` on stdout, then exits 0."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = chunks

    def request(self, op: str, **fields: Any) -> None:
        assert op == "cp-get"

    def interact(self, on_data: Callable[[int, bytes], None], until: Iterable[str]) -> dict[str, Any]:
        for chunk in self.chunks:
            on_data(1, chunk)
        return {"op": "exec-exit", "code": 0}


@pytest.fixture
def guest_sends(monkeypatch: pytest.MonkeyPatch) -> Callable[[Iterable[bytes]], None]:
    def install(chunks: Iterable[bytes]) -> None:
        @contextlib.contextmanager
        def connected(_ctx: object, _ident: str) -> Iterator[FakeClient]:
            yield FakeClient(chunks)

        monkeypatch.setattr(copy, "connected", connected)

    return install


def copy_out(dest: Path, path: str = "/x", **kwargs: Any) -> None:
    copy.copy_out(None, "c", path, dest, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    (tmp_path / "dest").mkdir()
    return tmp_path / "dest"


@pytest.fixture
def shadow(tmp_path: Path) -> Path:
    """A file outside the destination standing for the host's /etc/shadow."""
    path = tmp_path / "shadow"
    path.write_text("root:secret\n")
    path.chmod(0o640)
    return path


def test_a_hard_link_out_of_the_destination_is_refused_and_its_target_untouched(
        guest_sends: Any, dest: Path, shadow: Path) -> None:
    guest_sends(frames(tar_of(directory("x"), member("x/h", tarfile.LNKTYPE, link=str(shadow)),
                              member("x/h", data=b"root::0:\n", mode=0o4777, uid=4321, gid=4321))))
    with pytest.raises(MicropodError, match="refusing the hard link x/h"):
        copy_out(dest)
    assert shadow.read_text() == "root:secret\n"
    st = shadow.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_nlink) == (0o640, os.getuid(), 1)


def test_a_regular_member_after_a_hard_link_of_its_name_replaces_the_link(guest_sends: Any, dest: Path) -> None:
    guest_sends(frames(tar_of(directory("x"), member("x/f", data=b"one"),
                              member("x/h", tarfile.LNKTYPE, link="x/f"), member("x/h", data=b"two"))))
    copy_out(dest)
    assert (dest / "x" / "f").read_text() == "one"
    assert (dest / "x" / "h").read_text() == "two"


def test_hard_links_within_the_copy_are_kept(guest_sends: Any, dest: Path) -> None:
    guest_sends(frames(tar_of(directory("x"), member("x/f", data=b"one"), member("x/h", tarfile.LNKTYPE, link="x/f"))))
    copy_out(dest)
    assert (dest / "x" / "f").stat().st_ino == (dest / "x" / "h").stat().st_ino


def test_a_hard_link_to_a_symlink_of_the_copy_is_refused(guest_sends: Any, dest: Path, shadow: Path) -> None:
    guest_sends(frames(tar_of(directory("x"), member("x/s", tarfile.SYMTYPE, link=str(shadow)),
                              member("x/h", tarfile.LNKTYPE, link="x/s"), member("x/h", data=b"owned"))))
    with pytest.raises(MicropodError, match="refusing the hard link"):
        copy_out(dest)
    assert shadow.read_text() == "root:secret\n"


def test_a_member_beneath_a_symlink_of_the_same_tar_is_refused(guest_sends: Any, dest: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    guest_sends(frames(tar_of(directory("x"), member("x/sub", tarfile.SYMTYPE, link=str(outside)),
                              member("x/sub/evil", data=b"owned"))))
    with pytest.raises(MicropodError, match="refusing to write beneath x/sub: it is a symbolic link"):
        copy_out(dest)
    assert list(outside.iterdir()) == []
    assert (dest / "x" / "sub").is_symlink()  # links themselves are copied as links


def test_a_second_copy_does_not_write_through_a_link_the_first_planted(
        guest_sends: Any, dest: Path, tmp_path: Path) -> None:
    outside = tmp_path / "etc"
    outside.mkdir()
    guest_sends(frames(tar_of(directory("data"), member("data/sub", tarfile.SYMTYPE, link=str(outside)))))
    copy_out(dest, path="/data")
    assert (dest / "data" / "sub").is_symlink()
    guest_sends(frames(tar_of(directory("data"), directory("data/sub"), member("data/sub/x", data=b"owned"))))
    with pytest.raises(MicropodError, match="data/sub"):
        copy_out(dest, path="/data")
    guest_sends(frames(tar_of(directory("data"), member("data/sub/x", data=b"owned"))))
    with pytest.raises(MicropodError, match="refusing to write beneath data/sub: it is a symbolic link"):
        copy_out(dest, path="/data")
    assert list(outside.iterdir()) == []


def test_merging_replaces_a_symlink_in_the_place_of_a_file_instead_of_writing_through_it(
        guest_sends: Any, dest: Path, shadow: Path) -> None:
    (dest / "x").mkdir()
    (dest / "x" / "f").symlink_to(shadow)
    guest_sends(frames(tar_of(directory("x"), member("x/f", data=b"new"))))
    copy_out(dest)
    assert shadow.read_text() == "root:secret\n"
    assert not (dest / "x" / "f").is_symlink() and (dest / "x" / "f").read_text() == "new"


def test_devices_fifos_and_sockets_are_skipped_with_one_warning(
        guest_sends: Any, dest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    guest_sends(frames(tar_of(directory("x"), member("x/fifo", tarfile.FIFOTYPE), member("x/null", tarfile.CHRTYPE),
                              member("x/disk", tarfile.BLKTYPE), member("x/f", data=b"kept"))))
    copy_out(dest)
    assert sorted(p.name for p in (dest / "x").iterdir()) == ["f"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: skipped 3 ") and "x/fifo" in err[0], err


def test_setuid_setgid_and_a_files_sticky_bit_are_dropped(guest_sends: Any, dest: Path) -> None:
    guest_sends(frames(tar_of(directory("x", 0o3755), directory("x/tmp", 0o1777),
                              member("x/su", data=b"#!", mode=0o7755))))
    copy_out(dest)
    assert stat.S_IMODE((dest / "x").stat().st_mode) == 0o1755
    assert stat.S_IMODE((dest / "x" / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((dest / "x" / "su").stat().st_mode) == 0o755


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_files_are_the_invoking_users_unless_archive(guest_sends: Any, dest: Path) -> None:
    tar = tar_of(directory("x"), member("x/f", data=b"a", uid=4321, gid=8765),
                 member("x/s", tarfile.SYMTYPE, link="f", uid=4321, gid=8765))
    guest_sends(frames(tar))
    copy_out(dest / "plain")
    for path in (dest / "plain", dest / "plain" / "f", dest / "plain" / "s"):
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), path
    guest_sends(frames(tar))
    copy_out(dest / "kept", archive=True)
    for path in (dest / "kept" / "f", dest / "kept" / "s"):
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (4321, 8765), path


@pytest.mark.parametrize("name", ["../evil", "x/../../evil", "/abs/evil"])
def test_absolute_names_and_dotdot_are_refused(guest_sends: Any, dest: Path, tmp_path: Path, name: str) -> None:
    guest_sends(frames(tar_of(directory("x"), member(name, data=b"owned"))))
    with pytest.raises(MicropodError, match="refusing the archive member"):
        copy_out(dest)
    assert not (tmp_path / "evil").exists() and not Path("/abs/evil").exists()
    assert not [p for p in dest.rglob("*") if p.is_file()]


def test_overlong_names_and_deep_paths_are_refused(guest_sends: Any, dest: Path) -> None:
    for name in ["x/" + "a" * 300, "x/" + "d/" * 300 + "f", "x/" + "a/" * 2100]:
        guest_sends(frames(tar_of(directory("x"), member(name, data=b"z"))))
        with pytest.raises(MicropodError, match=r"refusing|longer than"):
            copy_out(dest)


def test_the_host_names_the_top_whatever_the_tar_calls_it(guest_sends: Any, dest: Path) -> None:
    guest_sends(frames(tar_of(directory("x"), member("x/a", data=b"a"), member("other/b", data=b"b"))))
    copy_out(dest / "renamed")
    assert sorted(p.name for p in (dest / "renamed").iterdir()) == ["a", "b"]
    assert sorted(p.name for p in dest.iterdir()) == ["renamed"]


def test_a_file_over_a_directory_and_a_directory_over_a_file_are_errors(guest_sends: Any, dest: Path) -> None:
    (dest / "x").mkdir()
    guest_sends(frames(tar_of(member("x", data=b"file"))))
    with pytest.raises(MicropodError, match="cannot overwrite directory x with a non-directory"):
        copy_out(dest)
    (dest / "file").write_text("f")
    guest_sends(frames(tar_of(directory("x"))))
    with pytest.raises(MicropodError, match="cannot overwrite non-directory file with a directory"):
        copy_out(dest / "file")


def test_a_stream_that_is_not_a_tar_is_one_clear_error(guest_sends: Any, dest: Path) -> None:
    guest_sends([b"\x01" * 1024])
    with pytest.raises(MicropodError, match="bad checksum"):
        copy_out(dest)


def big(name: str, size: int) -> tarfile.TarInfo:
    info, _ = member(name)
    info.size = size
    return info


def headers(*infos: tarfile.TarInfo) -> bytes:
    """The members' headers alone, for a stream whose data the test sends itself."""
    return b"".join(info.tobuf(tarfile.PAX_FORMAT) for info in infos)


def _regular_files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def test_a_huge_member_streams_into_its_place_without_a_temporary_archive(guest_sends: Any, dest: Path) -> None:
    size = 64 << 20
    header = headers(directory("x")[0], big("x/big", size))
    seen: list[dict[str, int]] = []

    def stream() -> Iterator[bytes]:
        yield header
        chunk = b"z" * (1 << 20)
        for i in range(size // len(chunk)):
            if i == size // len(chunk) // 2:
                seen.append(_regular_files(dest))
            yield chunk
        yield bytes(1024)

    guest_sends(stream())
    copy_out(dest)
    [midway] = seen
    [(name, written)] = midway.items()  # one file only: the member's own, being written beside its place
    assert name.startswith("x/.micropod-cp-") and written == size // 2
    assert _regular_files(dest) == {"x/big": size}


def test_a_stream_cut_inside_a_member_leaves_no_partial_file(guest_sends: Any, dest: Path) -> None:
    guest_sends(frames(headers(directory("x")[0], big("x/big", 1 << 40)) + b"z" * 100_000))
    with pytest.raises(MicropodError, match="ended in the middle"):
        copy_out(dest)
    assert _regular_files(dest) == {}


ENOSPC_SCRIPT = """
import contextlib, json, os, sys
from pathlib import Path
from micropod import syscalls
from micropod.errors import MicropodError
from micropod.cli import copy
from tests.test_extract_beneath import FakeClient, frames, member, directory, tar_of

target = Path(sys.argv[1])
syscalls.unshare(syscalls.CLONE_NEWNS)
syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
syscalls.mount("tmpfs", str(target), "tmpfs", 0, "size=1m")
tar = tar_of(directory("x"), member("x/small", data=b"s" * 1000), member("x/big", data=b"b" * (4 << 20)))
copy.connected = contextlib.contextmanager(lambda _c, _i: (yield FakeClient(frames(tar))))
try:
    copy.copy_out(None, "c", "/x", target)
    error = None
except MicropodError as exc:
    error = str(exc)
files = {str(p.relative_to(target)): p.stat().st_size for p in target.rglob("*") if p.is_file()}
print(json.dumps({"error": error, "files": files}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a tmpfs in a private mount namespace needs root")
def test_a_full_disk_stops_the_copy_with_one_error_and_no_partial_file(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    out = subprocess.run([sys.executable, "-c", ENOSPC_SCRIPT, str(tmp_path / "full")], capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).parent.parent, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["error"] is not None and "no space left on the device while writing x/big" in result["error"]
    assert "\n" not in result["error"]
    assert result["files"] == {"x/small": 1000}


def test_an_oversized_pax_header_is_refused_before_it_is_read(guest_sends: Any, dest: Path) -> None:
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, 1 << 30
    guest_sends(frames(headers(pax) + b"9" * 100_000))
    with pytest.raises(MicropodError, match="extended header of 1073741824 bytes"):
        copy_out(dest)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_in_each_format_arrive_whole(guest_sends: Any, dest: Path, fmt: int) -> None:
    long = "x/" + "/".join(["segment-of-a-long-path"] * 8) + "/f"  # ustar splits it into prefix and name
    link = long if fmt != tarfile.USTAR_FORMAT else "short"
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for info, data in (directory("x"), member(long, data=b"deep"), member("x/l", tarfile.SYMTYPE, link=link)):
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    guest_sends(frames(out.getvalue()))
    copy_out(dest)
    assert (dest / long).read_text() == "deep"
    assert os.readlink(dest / "x" / "l") == link
