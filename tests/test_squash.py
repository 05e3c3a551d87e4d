"""Squashfs bases: built through tar2sqfs, checked with sqfs2tar, cached, built once, never partial."""

from __future__ import annotations

import multiprocessing
import tarfile
from pathlib import Path

import pytest

from micropod import proc
from micropod.errors import RootfsError
from micropod.image.load import load_image
from micropod.image.store import ImageStore
from micropod.paths import StateRoot
from micropod.rootfs.squash import build_squashfs, ensure_rootfs
from tests.imagetools import (
    Entry,
    compress,
    d,
    f,
    flatten_tree,
    hard,
    layer_tar,
    oci_layout,
    squash_tree,
    sym,
    wh,
)

SPEC = (
    [d("etc"), f("etc/passwd", "root:x:0:0::/root:/bin/sh\n"), f("bin/tool", "T" * 5000, 0o4755),
     hard("bin/alias", "bin/tool"), sym("bin/sh", "tool"), f("gone", "x"),
     Entry("dev/null", tarfile.CHRTYPE, mode=0o666, major=1, minor=3), d("tmp", 0o1777),
     f("caf\udce9", "latin1 name"), f("x/" + "y" * 200, "long")],
    [wh("gone"), f("etc/hostname", "h\n"), hard("etc/tool-link", "bin/tool"),
     f("attr", "a", xattrs={"user.k": "v"})],
)


def _store_with_image(tmp_path: Path, spec=SPEC, how="gzip"):
    root = StateRoot(tmp_path / "root").ensure()
    store = ImageStore(root.images)
    layout = tmp_path / "layout"
    oci_layout(layout, [compress(layer_tar(e), how) for e in spec], ref="localhost/t:latest")
    (image,) = load_image(store, layout)
    return root, store, image


def _comparable(tree):
    """Hard links come back from sqfs2tar with either name as the link; compare content instead."""
    out = {}
    for path, node in tree.items():
        if node.kind == tarfile.LNKTYPE:
            node = tree[node.link]
        out[path] = (node.kind, node.mode, node.uid, node.gid, node.data, node.link if node.kind == tarfile.SYMTYPE
                     else "", node.dev, node.xattrs)
    return out


def test_squashfs_holds_exactly_the_flattened_tree(tmp_path):
    root, store, image = _store_with_image(tmp_path)
    sqfs = ensure_rootfs(root, store, image)
    assert sqfs == root.rootfs(image.id)
    expected = _comparable(flatten_tree(*SPEC))
    got = _comparable(squash_tree(sqfs))
    implicit = {p for p, n in got.items() if p not in expected and n[:4] == (tarfile.DIRTYPE, 0o755, 0, 0)}
    assert implicit == {"bin", "dev", "x"}  # parents no layer lists get tar2sqfs's --defaults
    assert {p: n for p, n in got.items() if p not in implicit} == expected
    listing = proc.run(["rdsquashfs", "-s", "/bin/alias", sqfs]).stdout.decode()
    assert "Hard link count: 3" in listing or "link count: 3" in listing.lower()


def test_cached_and_left_alone(tmp_path):
    root, store, image = _store_with_image(tmp_path)
    first = ensure_rootfs(root, store, image)
    mtime = first.stat().st_mtime_ns
    assert ensure_rootfs(root, store, image).stat().st_mtime_ns == mtime


def _build(args):
    root_path, images_path, name = args
    store = ImageStore(Path(images_path))
    return str(ensure_rootfs(StateRoot(Path(root_path)), store, store.resolve(name)))


def test_concurrent_builds_build_once(tmp_path):
    root, _, image = _store_with_image(tmp_path)
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_build, [(str(root.path), str(root.images), "localhost/t")] * 4)
    assert set(results) == {str(root.rootfs(image.id))}
    assert list(root.tmp.iterdir()) == []
    assert [p.name for p in root.rootfs_dir.iterdir() if not p.name.startswith(".")] == [f"{image.id}.sqfs"]


def test_failed_build_leaves_nothing(tmp_path):
    root, store, image = _store_with_image(tmp_path, spec=([f("a", "a"), hard("h", "nowhere")],))
    with pytest.raises(RootfsError, match="nowhere"):
        ensure_rootfs(root, store, image)
    assert not root.rootfs(image.id).exists()
    assert list(root.tmp.iterdir()) == []


def test_corrupt_blob_fails_the_build_cleanly(tmp_path):
    root, store, image = _store_with_image(tmp_path)
    blob = store.blob_path(image.layers[0].digest)
    data = bytearray(blob.read_bytes())
    data[-20] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    with pytest.raises(Exception, match=r"sha256:|not a valid tar"):
        ensure_rootfs(root, store, image)
    assert not root.rootfs(image.id).exists()
    assert list(root.tmp.iterdir()) == []


def test_tar2sqfs_resolves_hard_links_before_their_target(tmp_path):
    # flatten writes hard links last; tar2sqfs must not care about the order either way.
    tar = layer_tar([hard("link", "target"), f("target", "content")])
    out = tmp_path / "o.sqfs"
    proc.run(["tar2sqfs", "--quiet", "--no-skip", "--force", out], input=tar)
    tree = _comparable(squash_tree(out))
    assert tree["link"][4] == tree["target"][4] == b"content"
    assert "Hard link count: 2" in proc.run(["rdsquashfs", "-s", "/link", out]).stdout.decode()


def test_build_squashfs_reports_tar2sqfs_failure(tmp_path):
    _, store, image = _store_with_image(tmp_path)
    with pytest.raises(Exception, match="tar2sqfs"):
        build_squashfs(store.image(image), tmp_path / "missing-dir" / "x.sqfs")


def test_root_directory_attributes_come_from_the_layers(tmp_path):
    root, store, image = _store_with_image(tmp_path, spec=([d("./", 0o750, uid=3), f("a")],))
    stat = proc.run(["rdsquashfs", "-s", "/", ensure_rootfs(root, store, image)]).stdout.decode()
    assert "Access: 0750" in stat and "UID: 3" in stat
