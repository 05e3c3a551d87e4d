"""The OCI layout store: verified atomic blobs, a lock-protected index, docker's name rules, gc."""

from __future__ import annotations

import io
import json
import multiprocessing
from pathlib import Path

import pytest

from micropod.errors import ConflictError, DigestMismatchError, ImageError, NotFoundError, UsageError
from micropod.image.digest import sha256_digest
from micropod.image.model import OCI_CONFIG, OCI_LAYER, Descriptor, Manifest, canonical_json
from micropod.image.store import ImageStore


def _image(store: ImageStore, marker: str = "x", *, cmd: str = "/bin/sh") -> str:
    layer = store.put_blob(marker.encode() * 100, OCI_LAYER)
    config = store.put_blob(canonical_json({
        "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": [cmd], "Env": ["A=1"], "WorkingDir": "/w", "User": "1000",
                   "ExposedPorts": {"80/tcp": {}}, "Labels": {"k": "v"}, "StopSignal": "SIGQUIT"},
        "rootfs": {"type": "layers", "diff_ids": [layer.digest]}, "marker": marker}), OCI_CONFIG)
    return store.put_blob(Manifest(config, (layer,)).to_bytes()).digest


def _leftovers(store: ImageStore) -> list[Path]:
    return list((store.path / "ingest").iterdir())


def test_empty_store_lists_nothing_without_writing(tmp_path):
    store = ImageStore(tmp_path / "images")
    assert store.list() == []
    assert not store.path.exists()


def test_layout_files(tmp_path):
    store = ImageStore(tmp_path)
    store.init()
    assert json.loads((tmp_path / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert json.loads((tmp_path / "index.json").read_text())["manifests"] == []


def test_ingest_verifies_and_publishes(tmp_path):
    store = ImageStore(tmp_path)
    data = b"hello" * 1000
    digest = sha256_digest(data)
    assert store.ingest(io.BytesIO(data), digest, len(data)) == digest
    assert store.has_blob(digest) and store.blob_path(digest).read_bytes() == data
    with store.open_blob(digest) as r:
        assert r.read() == data
    assert _leftovers(store) == []


def test_ingest_without_expected_digest_computes_it(tmp_path):
    store = ImageStore(tmp_path)
    assert store.ingest(io.BytesIO(b"abc")) == sha256_digest(b"abc")


def test_digest_mismatch_names_the_blob_and_leaves_nothing(tmp_path):
    store = ImageStore(tmp_path)
    wrong = "sha256:" + "1" * 64
    with pytest.raises(DigestMismatchError, match=wrong):
        store.ingest(io.BytesIO(b"data"), wrong)
    assert not store.has_blob(wrong) and not store.has_blob(sha256_digest(b"data"))
    assert _leftovers(store) == []


@pytest.mark.parametrize("size, why", [(3, "larger than"), (10, "truncated")])
def test_size_mismatch(tmp_path, size, why):
    store = ImageStore(tmp_path)
    with pytest.raises(DigestMismatchError, match=why):
        store.ingest(io.BytesIO(b"data"), sha256_digest(b"data"), size)
    assert _leftovers(store) == [] and list(store._blobs.iterdir()) == []


def test_failing_stream_leaves_nothing(tmp_path):
    class Broken(io.RawIOBase):
        def read(self, n=-1):
            raise OSError("network went away")

    store = ImageStore(tmp_path)
    with pytest.raises(ImageError, match="network went away"):
        store.ingest(Broken(), sha256_digest(b"x"))  # type: ignore[arg-type]
    assert _leftovers(store) == []


def test_present_blob_is_not_read_again(tmp_path):
    store = ImageStore(tmp_path)
    desc = store.put_blob(b"abc")

    class Untouchable(io.RawIOBase):
        def read(self, n=-1):
            raise AssertionError("read")

    assert store.ingest(Untouchable(), desc.digest) == desc.digest  # type: ignore[arg-type]


def test_open_blob_detects_corruption_on_disk(tmp_path):
    store = ImageStore(tmp_path)
    desc = store.put_blob(b"original")
    store.blob_path(desc.digest).write_bytes(b"tampered")
    with pytest.raises(DigestMismatchError, match=desc.digest), store.open_blob(desc.digest) as r:
        r.read()
    with pytest.raises(NotFoundError):
        store.open_blob("sha256:" + "2" * 64)


def test_stored_image_fields(tmp_path):
    store = ImageStore(tmp_path)
    digest = _image(store)
    store.tag("app:1", digest)
    img = store.resolve("app:1")
    assert img.refs == ("docker.io/library/app:1",)
    assert img.manifest_digest == digest and img.id == img.config_digest.removeprefix("sha256:")
    c = img.config
    assert (c.cmd, c.env, c.working_dir, c.user, c.stop_signal) == (("/bin/sh",), ("A=1",), "/w", "1000", "SIGQUIT")
    assert c.exposed_ports == ("80/tcp",) and c.labels == {"k": "v"}
    assert (c.architecture, c.os, str(img.platform)) == ("amd64", "linux", "linux/amd64")
    assert img.created == "2024-01-01T00:00:00Z"
    assert len(img.layers) == 1 and img.size == img.layers[0].size + store.blob_path(img.config_digest).stat().st_size
    entry = json.loads((tmp_path / "index.json").read_text())["manifests"][0]
    assert entry["annotations"] == {"org.opencontainers.image.ref.name": "docker.io/library/app:1"}


def test_resolve_rules(tmp_path):
    store = ImageStore(tmp_path)
    hub, local = _image(store, "hub"), _image(store, "local")
    store.tag("localhost/hello:latest", local)
    assert store.resolve("hello").manifest_digest == local  # falls back to localhost/
    store.tag("hello", hub)
    assert store.resolve("hello").manifest_digest == hub  # docker.io first
    assert store.resolve("localhost/hello").manifest_digest == local
    assert store.resolve("docker.io/library/hello:latest").manifest_digest == hub
    img = store.resolve("hello")
    assert store.resolve(img.id).manifest_digest == hub
    assert store.resolve(f"sha256:{img.id}").manifest_digest == hub
    assert store.resolve(img.id[:12]).manifest_digest == hub
    assert store.resolve(f"hello@{hub}").manifest_digest == hub
    with pytest.raises(NotFoundError, match=r"^No such image: nothere$"):
        store.resolve("nothere")
    with pytest.raises(NotFoundError, match="No such image: hello:2"):
        store.resolve("hello:2")
    with pytest.raises(NotFoundError):
        store.resolve(f"other@{hub}")  # digest must belong to that repository


def _config(marker: str) -> bytes:
    return canonical_json({"architecture": "amd64", "os": "linux", "marker": marker,
                           "rootfs": {"type": "layers", "diff_ids": []}})


def test_ambiguous_id_prefix(tmp_path):
    seen: dict[str, str] = {}
    i = 0
    while True:  # two configs whose digests share 4 hex digits: a birthday search, a few hundred tries
        prefix = sha256_digest(_config(str(i)))[7:11]
        if prefix in seen:
            break
        seen[prefix] = str(i)
        i += 1
    store = ImageStore(tmp_path)
    for n, marker in enumerate((seen[prefix], str(i))):
        config = store.put_blob(_config(marker), OCI_CONFIG)
        store.tag(f"img{n}", store.put_blob(Manifest(config, ()).to_bytes()).digest)
    with pytest.raises(UsageError, match="ambiguous"):
        store.resolve(prefix)
    assert store.resolve(store.resolve("img1").id[:12]).refs == ("docker.io/library/img1:latest",)
    with pytest.raises(NotFoundError):
        store.resolve("abc")  # under 4 hex digits is never an id


def test_tag_moves_and_leaves_a_dangling_image(tmp_path):
    store = ImageStore(tmp_path)
    a, b = _image(store, "a"), _image(store, "b")
    store.tag("app", a)
    store.tag("app", b)
    images = {i.manifest_digest: i.refs for i in store.list()}
    assert images == {a: (), b: ("docker.io/library/app:latest",)}


def test_tag_refuses_incomplete_images(tmp_path):
    store = ImageStore(tmp_path)
    digest = _image(store)
    store.blob_path(store.read_manifest(digest).layers[0].digest).unlink()
    with pytest.raises(NotFoundError, match="missing"):
        store.tag("app", digest)
    with pytest.raises(UsageError, match="needs a tag"):
        store.tag(f"app@{digest}", digest)
    assert store.list() == []


def test_remove_untags_then_deletes(tmp_path):
    store = ImageStore(tmp_path)
    digest = _image(store)
    store.tag("app:1", digest)
    store.tag("app:2", digest)
    img = store.resolve("app:1")
    with pytest.raises(ConflictError, match="must be forced"):
        store.remove(img.id[:12])
    result = store.remove("app:1")
    assert list(result) == ["Untagged: docker.io/library/app:1"]
    result = store.remove("app:2")
    assert list(result) == ["Untagged: docker.io/library/app:2", f"Deleted: {img.config_digest}"]
    assert store.list() == []
    with pytest.raises(NotFoundError):
        store.remove("app:2")


def test_gc_deletes_only_unreferenced_blobs(tmp_path):
    store = ImageStore(tmp_path)
    keep, drop = _image(store, "keep"), _image(store, "drop")
    store.tag("keep", keep)
    store.tag("drop", drop)
    stray = store.put_blob(b"stray")
    store.remove("drop")
    assert store.gc() == 4  # drop's manifest, config and layer, and the stray blob
    assert not store.has_blob(stray.digest)
    kept = store.resolve("keep")
    assert all(store.has_blob(d) for d in (keep, kept.config_digest, kept.layers[0].digest))
    assert store.gc() == 0


def _tag_many(args):
    path, digest, worker = args
    store = ImageStore(Path(path))
    for i in range(15):
        store.tag(f"localhost/w{worker}:t{i}", digest)


def test_concurrent_tagging_keeps_every_ref(tmp_path):
    store = ImageStore(tmp_path)
    digest = _image(store)
    with multiprocessing.get_context("fork").Pool(6) as pool:
        pool.map(_tag_many, [(str(tmp_path), digest, w) for w in range(6)])
    (img,) = store.list()
    assert len(img.refs) == 90
    json.loads((tmp_path / "index.json").read_text())
    assert _leftovers(store) == []


def test_descriptor_roundtrip():
    desc = Descriptor(OCI_LAYER, sha256_digest(b""), 0, {"a": "b"})
    assert Descriptor.from_json(desc.to_json()) == desc
