"""Flattening layers: OCI whiteout semantics, metadata kept, hostile input refused, checked with umoci."""

from __future__ import annotations

import io
import os
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from micropod import proc
from micropod.errors import DigestMismatchError, RootfsError, UsageError
from micropod.rootfs.flatten import flatten
from micropod.rootfs.limits import ImageLimits
from tests.imagetools import (
    Entry,
    MemLayer,
    compress,
    d,
    f,
    flatten_tree,
    hard,
    layer_tar,
    layers,
    oci_layout,
    opq,
    sym,
    wh,
)

REG, DIR, SYM, LNK = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE


def test_upper_layer_wins_and_lower_content_merges():
    tree = flatten_tree([d("etc"), f("etc/a", "lower"), f("etc/b", "b")], [d("etc", 0o700), f("etc/a", "upper")])
    assert tree["etc/a"].data == b"upper"
    assert tree["etc/b"].data == b"b"
    assert tree["etc"].mode == 0o700


def test_whiteout_removes_file_and_subtree():
    tree = flatten_tree(
        [d("a"), f("a/x", "x"), f("a/y", "y"), d("gone"), f("gone/deep", "z")],
        [wh("a/x"), wh("gone")],
    )
    assert "a/x" not in tree and "gone" not in tree and "gone/deep" not in tree
    assert tree["a/y"].data == b"y"
    assert not any(".wh." in p for p in tree)


def test_whiteout_applies_only_to_lower_layers():
    tree = flatten_tree([f("keep", "old")], [f("keep", "new"), wh("keep")])
    assert tree["keep"].data == b"new"


def test_opaque_directory_hides_lower_children_only():
    tree = flatten_tree(
        [d("d"), f("d/x"), d("d/sub"), f("d/sub/y"), f("other")],
        [d("d"), opq("d"), f("d/z", "z")],
    )
    assert {p for p in tree if p.startswith("d")} == {"d", "d/z"}
    assert "other" in tree


def test_file_replaced_by_directory_and_back():
    tree = flatten_tree([f("p", "file"), d("q"), f("q/child")], [d("p"), f("p/c", "c"), f("q", "now a file")])
    assert tree["p"].kind == DIR and tree["p/c"].data == b"c"
    assert tree["q"].kind == REG and tree["q"].data == b"now a file"
    assert "q/child" not in tree


def test_upper_path_below_lower_symlink_gets_a_real_directory():
    # Overlay semantics: the upper directory shadows the lower symlink; nothing resolves through it.
    tree = flatten_tree([sym("link", "/etc")], [f("link/passwd", "mine")])
    assert "link" not in tree or tree["link"].kind == DIR
    assert tree["link/passwd"].data == b"mine"


def test_hardlinks_within_and_across_layers():
    tree = flatten_tree([f("bin/t", "T", 0o755), hard("bin/same", "bin/t")], [hard("usr/l", "bin/t")])
    assert tree["bin/same"].kind == LNK and tree["bin/same"].link == "bin/t"
    assert tree["usr/l"].kind == LNK and tree["usr/l"].link == "bin/t"


def test_hardlink_to_a_replaced_target_keeps_the_old_content():
    tree = flatten_tree([f("t", "old", 0o4755), hard("l", "t")], [f("t", "new")])
    assert tree["t"].data == b"new"
    assert tree["l"].kind == REG and tree["l"].data == b"old" and tree["l"].mode == 0o4755


def test_hardlink_to_a_deleted_target_becomes_a_file():
    tree = flatten_tree([f("t", "old"), hard("l", "t"), hard("l2", "l")], [wh("t")])
    assert "t" not in tree
    assert tree["l"].data == b"old"
    assert tree["l2"].kind == LNK and tree["l2"].link == "l"  # links to the materialised copy


def test_hardlink_chain_resolves_to_the_file():
    tree = flatten_tree([f("t", "x"), hard("a", "t"), hard("b", "a")])
    assert tree["b"].kind == LNK and tree["b"].link == "t"


def test_metadata_is_kept():
    long_name = "dir/" + "n" * 250
    odd = "caf\udce9-latin1"  # the bytes caf\xe9 as tarfile decodes them with surrogateescape
    tree = flatten_tree([
        d("dir", 0o750, uid=5, gid=6),
        f(long_name, "long"),
        f(odd, "odd"),
        f("suid", "s", 0o4755),
        f("sgid", "g", 0o2755),
        d("tmp", 0o1777),
        sym("rel", "../x/y"),
        Entry("dev/null", tarfile.CHRTYPE, mode=0o666, major=1, minor=3),
        Entry("dev/sda", tarfile.BLKTYPE, mode=0o660, major=8, minor=0, gid=6),
        Entry("fifo", tarfile.FIFOTYPE, mode=0o600),
        f("cap", "c", xattrs={"security.capability": "\x01\x00\x00\x02", "user.note": "hi",
                              "system.posix_acl_access": "x"}),
        f("owned", "o", uid=1000, gid=1000),
    ])
    assert tree["dir"].mode == 0o750 and (tree["dir"].uid, tree["dir"].gid) == (5, 6)
    assert tree[long_name].data == b"long"
    assert tree[odd].data == b"odd" and os.fsencode(odd) == b"caf\xe9-latin1"
    assert tree["suid"].mode == 0o4755 and tree["sgid"].mode == 0o2755 and tree["tmp"].mode == 0o1777
    assert tree["rel"].kind == SYM and tree["rel"].link == "../x/y"
    assert tree["dev/null"].kind == tarfile.CHRTYPE and tree["dev/null"].dev == (1, 3)
    assert tree["dev/sda"].kind == tarfile.BLKTYPE and tree["dev/sda"].dev == (8, 0)
    assert tree["fifo"].kind == tarfile.FIFOTYPE
    # squashfs cannot hold system.* (POSIX ACLs); the rest survive
    assert tree["cap"].xattrs == {"security.capability": "\x01\x00\x00\x02", "user.note": "hi"}
    assert (tree["owned"].uid, tree["owned"].gid) == (1000, 1000)


@pytest.mark.parametrize("how", ["none", "gzip", "zstd"])
def test_compressions_give_the_same_tree(how):
    spec = ([d("a"), f("a/x", "x" * 10000)], [f("a/y", "y"), wh("a/x")])
    assert flatten_tree(*spec, how=how) == flatten_tree(*spec)


def test_mislabelled_compression_is_detected_by_magic():
    blob, _ = compress(layer_tar([f("x", "x")]), "gzip")
    out = io.BytesIO()
    flatten([MemLayer(blob, "application/vnd.oci.image.layer.v1.tar")], out)
    assert b"x" in out.getvalue()


def test_leading_slash_and_dot_are_stripped():
    tree = flatten_tree([f("/abs/file", "a"), f("./rel/file", "r"), d("./")])
    assert tree["abs/file"].data == b"a" and tree["rel/file"].data == b"r"


@pytest.mark.parametrize("entries, why", [
    ([f("../x")], "leaves the root"),
    ([f("a/../../x")], "leaves the root"),
    ([sym("link", "/etc"), f("link/passwd", "pwned")], "below a symlink"),
    ([f("file"), f("file/child")], "below a symlink or file"),
    ([hard("h", "../../etc/passwd")], "outside the root"),
    ([hard("h", "/")], "outside the root"),
    ([hard("h", "missing")], "not a file in the image"),
    ([d("dir"), hard("h", "dir")], "not a file in the image"),
])
def test_hostile_layers_are_refused(entries, why):
    with pytest.raises(RootfsError, match=why):
        flatten_tree(entries)


def test_corrupt_layer_fails_with_digest_mismatch():
    blob = layer_tar([f("x", "x")])
    bad = MemLayer(blob, claimed_digest="sha256:" + "0" * 64)
    with pytest.raises(DigestMismatchError, match="sha256:0000"):
        flatten([bad], io.BytesIO())


def test_garbage_layer_is_a_clear_error():
    with pytest.raises(RootfsError, match="not a valid tar"):
        flatten([MemLayer(b"\x1f\x8b" + b"nonsense" * 100)], io.BytesIO())


def test_duplicate_entries_in_one_layer_are_emitted_once():
    tree = flatten_tree([d("a", 0o700), d("a", 0o755), sym("s", "x"), sym("s", "y")])
    assert tree["a"].mode == 0o755 and tree["s"].link == "y"


def _disk_tree(root: Path) -> dict[str, tuple[str, bytes]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("sym", os.readlink(p).encode())
            elif p.is_dir():
                out[rel] = ("dir", b"")
            else:
                out[rel] = ("file", p.read_bytes())
    return out


@pytest.mark.skipif(not os.path.exists("/usr/bin/umoci"), reason="umoci not installed")
def test_matches_umoci_unpack(tmp_path):
    spec = (
        [d("etc"), f("etc/a", "a"), f("etc/b", "b"), d("d"), f("d/old"), d("d/sub"), f("d/sub/x"),
         f("p", "file"), d("q"), f("q/c"), sym("s", "etc/a"), f("t", "T")],
        [wh("etc/a"), d("d"), opq("d"), f("d/new", "n"), d("p"), f("p/in"), f("q", "file now")],
        [f("etc/a", "back"), sym("s2", "../etc"), wh("t"), f("u", "u")],
    )
    # umoci 0.4 cannot read zstd layers
    blobs = [compress(layer_tar(e), how) for e, how in zip(spec, ["gzip", "none", "gzip"], strict=True)]
    layout = tmp_path / "layout"
    oci_layout(layout, blobs, ref="t")
    bundle = tmp_path / "bundle"
    proc.run(["umoci", "unpack", "--rootless", "--image", f"{layout}:t", bundle])
    expected = _disk_tree(bundle / "rootfs")
    got = {p: ("dir" if n.kind == DIR else "sym" if n.kind == SYM else "file", n.link.encode() if n.kind == SYM
               else n.data) for p, n in flatten_tree(*spec).items()}
    assert got == expected


# -- limits on untrusted layers (micropod.rootfs.limits) ---------------------------------------------------

DEEP = "/".join(["a"] * 20_000)  # a 40 KB name: 50 KB of tar, 211 bytes gzipped


def _flatten_traced(layers: list[MemLayer], limits: ImageLimits | None = None) -> tuple[BaseException | None, int]:
    """(the error flatten raised, if any; the peak of memory allocated while it ran)."""
    tracemalloc.start()
    try:
        flatten(layers, io.BytesIO(), *([limits] if limits else []))
        error = None
    except Exception as exc:
        error = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return error, peak


def test_20000_components_are_refused_in_bounded_memory():
    layer = MemLayer(*compress(layer_tar([f(DEEP, "x")]), "gzip"))
    error, peak = _flatten_traced([layer])
    assert peak < 50 << 20, f"{peak >> 20} MiB"  # the set of ancestor paths took 386 MiB
    assert isinstance(error, RootfsError) and "PATH_MAX" in str(error), error
    assert len(str(error)) < 400  # the 40 KB name is not echoed whole


def test_path_handling_is_linear_when_the_limits_allow_20000_components():
    unbounded = ImageLimits(path_max=1 << 30, max_depth=1 << 30)
    layers = [MemLayer(*compress(layer_tar([f(DEEP, "x"), f(DEEP[:-1] + "b", "y")]), "gzip")),
              MemLayer(*compress(layer_tar([f(DEEP[:-1] + "c", "z")]), "gzip"))]
    error, peak = _flatten_traced(layers, unbounded)
    assert error is None
    assert peak < 50 << 20, f"{peak >> 20} MiB"


def test_depth_limit():
    flatten_tree([f("/".join(["d"] * 256), "ok")])
    with pytest.raises(RootfsError, match="deeper than 256 components"):
        flatten_tree([f("/".join(["d"] * 257), "x")])


def _path_of(size: int) -> str:
    """A relative path of `size` bytes, of 100-byte components."""
    parts, left = [], size
    while left > 101:
        parts.append("p" * 100)
        left -= 101
    return "/".join([*parts, "q" * left])


def test_path_max_counts_the_slash_and_the_nul():
    assert len(_path_of(4094)) == 4094
    assert flatten_tree([f(_path_of(4094), "ok")])[_path_of(4094)].data == b"ok"
    with pytest.raises(RootfsError, match=r"4096 bytes long, more than PATH_MAX \(4096\)"):
        flatten_tree([f(_path_of(4095))])
    with pytest.raises(RootfsError, match="link target of 4096 bytes"):
        flatten_tree([sym("s", "t" * 4096)])


def test_entry_count_limit():
    entries = [f(f"f{i}") for i in range(10)]
    flatten(layers(entries[:6], entries[6:]), io.BytesIO(), ImageLimits(max_entries=10))
    with pytest.raises(RootfsError, match="more than 10 entries"):
        flatten(layers(entries[:6], [*entries[6:], wh("f0")]), io.BytesIO(), ImageLimits(max_entries=10))


def test_metadata_bound():
    entries = [f("n" * 100 + str(i)) for i in range(10)]
    flatten(layers(entries), io.BytesIO(), ImageLimits(max_metadata=2000))
    with pytest.raises(RootfsError, match="file names, link targets and attributes exceed"):
        flatten(layers(entries), io.BytesIO(), ImageLimits(max_metadata=1000))


def test_uncompressed_size_bound_comes_from_the_environment(monkeypatch):
    bomb = layers([f("zeros", bytes(8 << 20))], how="gzip")  # 8 KiB of gzip
    assert bomb[0].size < 64 << 10
    monkeypatch.setenv("MICROPOD_MAX_IMAGE_SIZE", "1m")
    with pytest.raises(RootfsError, match=r"larger than 1 MiB uncompressed.*MICROPOD_MAX_IMAGE_SIZE"):
        flatten(bomb, io.BytesIO())
    monkeypatch.setenv("MICROPOD_MAX_IMAGE_SIZE", "9m")
    flatten(bomb, io.BytesIO())
    monkeypatch.setenv("MICROPOD_MAX_IMAGE_SIZE", "lots")
    with pytest.raises(UsageError, match="invalid MICROPOD_MAX_IMAGE_SIZE"):
        flatten(bomb, io.BytesIO())


def test_the_size_bound_counts_all_layers_and_trailing_garbage(monkeypatch):
    monkeypatch.setenv("MICROPOD_MAX_IMAGE_SIZE", "100k")
    tar = layer_tar([f("a", bytes(30 << 10))])
    flatten([MemLayer(tar)], io.BytesIO())
    with pytest.raises(RootfsError, match="larger than 100 KiB"):
        flatten([MemLayer(tar), MemLayer(layer_tar([f("b", bytes(30 << 10))])), MemLayer(tar)], io.BytesIO())
    with pytest.raises(RootfsError, match="larger than 100 KiB"):
        flatten([MemLayer(*compress(tar + bytes(200 << 10), "gzip"))], io.BytesIO())


def _raw_layer(*headers: bytes) -> MemLayer:
    return MemLayer(b"".join(headers) + tarfile.TarInfo("f").tobuf(tarfile.USTAR_FORMAT) + bytes(1024))


def _pax(records: dict[str, str], kind: bytes = tarfile.XHDTYPE) -> bytes:
    return tarfile.TarInfo._create_pax_generic_header(records, kind, "utf-8")  # type: ignore[attr-defined]


def test_extended_header_over_1_mib_is_refused_before_it_is_read():
    huge = _raw_layer(_pax({"SCHILY.xattr.user.big": "v" * (2 << 20)}))
    error, peak = _flatten_traced([huge])
    assert isinstance(error, RootfsError) and "extended header" in str(error), error
    assert peak < 1 << 20, f"{peak} bytes"  # tarfile would have read the 2 MiB record into memory


def test_global_pax_records_are_not_applied_to_every_file():
    flatten([_raw_layer(_pax({"comment": "git archive"}, tarfile.XGLTYPE))], io.BytesIO())
    with pytest.raises(RootfsError, match=r"global pax header sets .SCHILY\.xattr\.user\.x."):
        flatten([_raw_layer(_pax({"SCHILY.xattr.user.x": "1"}, tarfile.XGLTYPE))], io.BytesIO())


def test_a_chain_of_extended_headers_is_a_clear_error():
    with pytest.raises(RootfsError, match="chains too many tar extended headers"):
        flatten([_raw_layer(*[_pax({"comment": "c"})] * 3000)], io.BytesIO())
