"""`image unpack --to DIR` writes the same tree as `umoci unpack` (run as root, so ownership, devices,
setuid bits and xattrs are restored on both sides) over a corpus of awkward layers."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tarfile
from pathlib import Path

import pytest

from micropod import proc
from micropod.errors import RootfsError
from micropod.image.load import load_image
from micropod.image.store import ImageStore
from micropod.rootfs.extract import extract_image
from tests.imagetools import Entry, compress, d, f, hard, layer_tar, oci_layout, opq, sym, wh

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/umoci"),
                                reason="needs root and umoci")

LONG = "l" * 200
NON_UTF8 = "caf\udce9"  # b"caf\xe9" through surrogateescape
SETUID = 0o4755

CORPUS: tuple[list[Entry], ...] = (
    [d("bin"), f("bin/busybox", "BB" * 100, 0o755), hard("bin/sh", "bin/busybox"), f("bin/su", "su", SETUID),
     d("etc"), f("etc/a", "a"), f("etc/passwd", "root:x:0:0::/root:/bin/sh\n"), d("home"),
     d("home/user", uid=1000, gid=1000, mode=0o750), f("home/user/.profile", "x", uid=1000, gid=1000),
     d("dev"), Entry("dev/null", tarfile.CHRTYPE, mode=0o666, major=1, minor=3),
     Entry("dev/sda", tarfile.BLKTYPE, mode=0o660, major=8, minor=0, gid=6), Entry("dev/fifo", tarfile.FIFOTYPE),
     d("d"), f("d/old"), d("d/sub"), f("d/sub/x"), f("p", "file"), d("q"), f("q/c"), f("t", "T"),
     d("deep"), d(f"deep/{LONG}"), f(f"deep/{LONG}/{LONG}", "long"), f(NON_UTF8, "latin-1 name"),
     f("xattr", "x", xattrs={"user.micropod": "yes"}), sym("s", "etc/a"), sym("abs", "/etc/passwd"),
     d("sticky", mode=0o1777), f("sgid", "g", mode=0o2755)],
    [wh("etc/a"), d("d"), opq("d"), f("d/new", "n"), d("p"), f("p/in"), f("q", "file now"),
     hard("etc/b", "etc/passwd"), f("bin/su", "new su", SETUID), wh(NON_UTF8)],
    [f("etc/a", "back"), sym("s2", "../etc"), wh("t"), f("u", "u"), hard("u2", "bin/busybox"),
     f(f"{NON_UTF8}2", "again")],
)


def _tree(root: Path) -> tuple[dict[str, tuple[object, ...]], set[frozenset[str]]]:
    """path -> (type, mode, uid, gid, content hash or link target or rdev, xattrs); and hardlink groups."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.fsdecode(os.path.relpath(full, os.fsencode(root)))
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as fh:
                    detail: object = hashlib.sha256(fh.read()).hexdigest()
                inodes.setdefault(st.st_ino, set()).add(rel)
            elif stat.S_ISLNK(st.st_mode):
                detail = os.fsdecode(os.readlink(full))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                detail = (os.major(st.st_rdev), os.minor(st.st_rdev))
            else:
                detail = None
            xattrs = {} if stat.S_ISLNK(st.st_mode) else {
                a: os.getxattr(full, a, follow_symlinks=False) for a in os.listxattr(full, follow_symlinks=False)
                if a.startswith("user.")}
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, detail, xattrs)
    return out, {frozenset(g) for g in inodes.values() if len(g) > 1}


def _extract(tmp: Path, hows: list[str], name: str) -> Path:
    layout = tmp / f"layout-{name}"
    oci_layout(layout, [compress(layer_tar(e), how) for e, how in zip(CORPUS, hows, strict=True)], ref="t")
    store = ImageStore(tmp / f"store-{name}")
    image = load_image(store, layout)[0]
    dest = tmp / f"tree-{name}"
    extract_image(store.image(image), dest)
    return dest


def test_unpack_matches_umoci(tmp_path: Path) -> None:
    hows = ["gzip", "none", "gzip"]  # umoci 0.4 cannot read zstd layers
    layout = tmp_path / "layout-umoci"
    oci_layout(layout, [compress(layer_tar(e), how) for e, how in zip(CORPUS, hows, strict=True)], ref="t")
    proc.run(["umoci", "unpack", "--image", f"{layout}:t", tmp_path / "bundle"])
    expected, expected_links = _tree(tmp_path / "bundle" / "rootfs")
    got, got_links = _tree(_extract(tmp_path, hows, "gzip"))
    assert set(got) == set(expected)
    for path in sorted(expected):
        assert got[path] == expected[path], path
    assert got_links == expected_links
    assert got[f"deep/{LONG}/{LONG}"][0] == stat.S_IFREG
    assert got["bin/su"][1] == SETUID
    assert got["xattr"][5] == {"user.micropod": b"yes"}


def test_zstd_and_uncompressed_layers_give_the_same_tree(tmp_path: Path) -> None:
    reference = _tree(_extract(tmp_path, ["gzip", "gzip", "gzip"], "gzip"))
    assert _tree(_extract(tmp_path, ["zstd", "zstd", "zstd"], "zstd")) == reference
    assert _tree(_extract(tmp_path, ["none", "zstd", "gzip"], "mixed")) == reference


def test_unpack_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "tree-x").mkdir()
    (tmp_path / "tree-x" / "keep").write_text("mine")
    layout = tmp_path / "layout"
    oci_layout(layout, [compress(layer_tar([f("a", "a")]), "none")], ref="t")
    store = ImageStore(tmp_path / "store")
    image = load_image(store, layout)[0]
    with pytest.raises(RootfsError, match="not empty"):
        extract_image(store.image(image), tmp_path / "tree-x")


def test_symlinks_in_the_image_are_never_followed_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    layers = [[sym("escape", str(outside)), sym("up", "../../..")],
              [d("escape"), f("escape/pwned", "x"), f("up/pwned2", "y")]]
    layout = tmp_path / "layout"
    oci_layout(layout, [compress(layer_tar(e), "none") for e in layers], ref="t")
    store = ImageStore(tmp_path / "store")
    image = load_image(store, layout)[0]
    dest = tmp_path / "tree"
    with contextlib.suppress(RootfsError):  # refused or neutralised: either way nothing lands outside
        extract_image(store.image(image), dest)
    assert not list(outside.iterdir())
    assert not (tmp_path / "pwned2").exists()
