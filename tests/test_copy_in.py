"""`cp` into a container: what the host packs (links as links, nothing followed, no devices, owners)."""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from micropod.cli import copy


class FakeChannel:
    def __init__(self) -> None:
        self.sent = bytearray()
        self.eof = False

    def send_data(self, stream: int, data: bytes) -> None:
        assert stream == 0 and not self.eof
        self.sent += data

    def send_eof(self, stream: int) -> None:
        self.eof = True


class FakeClient:
    """A monitor client whose cp-put session takes stdin, then exits 0."""

    def __init__(self) -> None:
        self.channel = FakeChannel()

    def request(self, op: str, **fields: Any) -> None:
        assert op == "cp-put"

    def interact(self, on_data: Callable[[int, bytes], None], until: Iterable[str]) -> dict[str, Any]:
        return {"op": "exec-exit", "code": 0} if self.channel.eof else {"op": "exec-started"}


@pytest.fixture
def packed(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[tarfile.TarInfo]]:
    def run(src: Path, **kwargs: Any) -> list[tarfile.TarInfo]:
        client = FakeClient()

        @contextlib.contextmanager
        def connected(_ctx: object, _ident: str) -> Iterator[FakeClient]:
            yield client

        monkeypatch.setattr(copy, "connected", connected)
        copy.copy_in(None, src, "c", "/dst", **kwargs)  # type: ignore[arg-type]
        assert client.channel.eof
        with tarfile.open(fileobj=io.BytesIO(bytes(client.channel.sent))) as tar:
            return tar.getmembers()

    return run


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "secret").write_text("not to be copied\n")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("f\n")
    (src / "f").chmod(0o4755)
    (src / "out").symlink_to(tmp_path / "secret")
    (src / "dir").symlink_to(tmp_path)
    os.mkfifo(src / "fifo")
    return src


def test_links_are_packed_as_links_and_fifos_skipped_with_a_warning(
        packed: Any, tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    members = {m.name: m for m in packed(tree)}
    assert sorted(members) == ["src", "src/dir", "src/f", "src/out"]
    assert members["src/out"].issym() and members["src/out"].linkname == str(tmp_path / "secret")
    assert members["src/dir"].issym()
    assert members["src/f"].mode == 0o755
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: skipped 1 ") and "src/fifo" in err[0]


def test_a_symlink_given_as_the_source_is_copied_as_a_link(packed: Any, tree: Path) -> None:
    [member] = packed(tree / "out")
    assert member.issym() and member.name == "out"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_owners_are_root_unless_archive(packed: Any, tree: Path) -> None:
    os.chown(tree / "f", 4321, 8765)
    [plain] = [m for m in packed(tree) if m.name == "src/f"]
    assert (plain.uid, plain.gid) == (0, 0)
    [kept] = [m for m in packed(tree, archive=True) if m.name == "src/f"]
    assert (kept.uid, kept.gid) == (4321, 8765)
