"""`load` from OCI layouts, OCI archives (ours and skopeo's) and docker-save tars; every digest checked."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from micropod import proc
from micropod.errors import DigestMismatchError, ImageError, NotFoundError
from micropod.image.archive import LayoutWriter
from micropod.image.load import load_image
from micropod.image.model import OCI_INDEX, OCI_LAYER, OCI_LAYER_GZIP, Platform, canonical_json
from micropod.image.store import ImageStore
from tests.imagetools import compress, d, f, layer_tar, oci_layout

LAYER1 = layer_tar([d("etc"), f("etc/one", "1")])
LAYER2 = layer_tar([f("etc/two", "2")])


def _tar_dir(src: Path, out: Path) -> Path:
    with tarfile.open(out, "w") as tar:
        for p in sorted(src.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(src)), recursive=False)
    return out


def _index_entries(store: ImageStore) -> list[dict]:
    return json.loads((store.path / "index.json").read_text())["manifests"]


def test_oci_layout_directory(tmp_path):
    digest = oci_layout(tmp_path / "l", [compress(LAYER1, "gzip"), compress(LAYER2, "zstd")],
                        ref="localhost/app:1")
    store = ImageStore(tmp_path / "store")
    (img,) = load_image(store, tmp_path / "l")
    assert img.refs == ("localhost/app:1",) and img.manifest_digest == digest
    assert [layer.media_type for layer in img.layers][1].endswith("zstd")
    assert store.resolve("localhost/app:1") == img


def test_oci_archive_from_our_writer_is_idempotent(tmp_path):
    oci_layout(tmp_path / "l", [compress(LAYER1, "gzip")], ref="example.com/x/y:2")
    archive = _tar_dir(tmp_path / "l", tmp_path / "a.tar")
    store = ImageStore(tmp_path / "store")
    first = load_image(store, archive)
    assert load_image(store, archive) == first
    assert len(_index_entries(store)) == 1


def test_skopeo_oci_archive(tmp_path):
    if not shutil.which("skopeo"):
        pytest.skip("skopeo not installed")
    oci_layout(tmp_path / "l", [compress(LAYER1, "gzip"), compress(LAYER2, "none")], ref="t")
    archive = tmp_path / "skopeo.tar"
    proc.run(["skopeo", "copy", "--quiet", f"oci:{tmp_path / 'l'}:t",
              f"oci-archive:{archive}:localhost/skopeo:v1"], timeout=120)
    store = ImageStore(tmp_path / "store")
    (img,) = load_image(store, archive)
    assert img.refs == ("localhost/skopeo:v1",)
    assert len(img.layers) == 2


def test_bare_tag_ref_name_loads_untagged(tmp_path):
    oci_layout(tmp_path / "l", [compress(LAYER1, "none")], ref="latest")
    (img,) = load_image(ImageStore(tmp_path / "store"), tmp_path / "l")
    assert img.refs == ()


def _docker_save(tmp_path: Path, layers: list[bytes], tags: list[str], *, diff_ids: list[str] | None = None,
                 gz: bool = False, labels: dict[str, str] | None = None) -> Path:
    files: dict[str, bytes] = {}
    names = []
    for i, layer in enumerate(layers):
        name = f"{i:064x}/layer.tar"
        files[name] = layer
        names.append(name)
    config = canonical_json({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"], "Env": ["X=1"], "Labels": labels or {}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids or
                   ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]}})
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    files[config_name] = config
    files["manifest.json"] = json.dumps([{"Config": config_name, "RepoTags": tags, "Layers": names}]).encode()
    files["repositories"] = b"{}"
    archive = layer_tar(f(name, data) for name, data in files.items())
    out = tmp_path / ("save.tar.gz" if gz else "save.tar")
    out.write_bytes(gzip.compress(archive) if gz else archive)
    return out


@pytest.mark.parametrize("gz", [False, True])
def test_docker_save_tar(tmp_path, gz):
    archive = _docker_save(tmp_path, [LAYER1, LAYER2], ["myapp:1.0", "registry.local:5000/team/app:dev"], gz=gz)
    store = ImageStore(tmp_path / "store")
    (img,) = load_image(store, archive)
    assert img.refs == ("docker.io/library/myapp:1.0", "registry.local:5000/team/app:dev")
    assert [layer.media_type for layer in img.layers] == [OCI_LAYER, OCI_LAYER]
    assert img.config.env == ("X=1",)
    assert store.resolve("myapp:1.0") == img


def test_docker_save_with_gzip_layer(tmp_path):
    blob, _ = compress(LAYER1, "gzip")
    diff_id = "sha256:" + hashlib.sha256(LAYER1).hexdigest()
    (img,) = load_image(ImageStore(tmp_path / "s"), _docker_save(tmp_path, [blob], ["z"], diff_ids=[diff_id]))
    assert img.layers[0].media_type == OCI_LAYER_GZIP


def test_docker_save_diff_id_mismatch_adds_nothing(tmp_path):
    archive = _docker_save(tmp_path, [LAYER1], ["bad"], diff_ids=["sha256:" + "3" * 64])
    store = ImageStore(tmp_path / "store")
    with pytest.raises(DigestMismatchError, match="diff_id"):
        load_image(store, archive)
    assert store.list() == []


def test_missing_blob_adds_nothing(tmp_path):
    digest = oci_layout(tmp_path / "l", [compress(LAYER1, "gzip")])
    manifest = json.loads((tmp_path / "l/blobs/sha256" / digest.removeprefix("sha256:")).read_bytes())
    (tmp_path / "l/blobs/sha256" / manifest["layers"][0]["digest"].removeprefix("sha256:")).unlink()
    store = ImageStore(tmp_path / "store")
    with pytest.raises(ImageError, match="missing"):
        load_image(store, tmp_path / "l")
    assert store.list() == []


def test_tampered_blob_is_named(tmp_path):
    digest = oci_layout(tmp_path / "l", [compress(LAYER1, "none")])
    manifest = json.loads((tmp_path / "l/blobs/sha256" / digest.removeprefix("sha256:")).read_bytes())
    layer_digest = manifest["layers"][0]["digest"]
    path = tmp_path / "l/blobs/sha256" / layer_digest.removeprefix("sha256:")
    path.write_bytes(path.read_bytes().replace(b"1", b"2"))
    store = ImageStore(tmp_path / "store")
    with pytest.raises(DigestMismatchError, match=layer_digest):
        load_image(store, tmp_path / "l")
    assert store.list() == [] and not store.has_blob(layer_digest)


@pytest.mark.parametrize("content", [b"", b"not a tar at all" * 100, b"\x1f\x8b\x08garbage"])
def test_corrupt_archive_is_one_clear_error(tmp_path, content):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(content)
    with pytest.raises(ImageError) as info:
        load_image(ImageStore(tmp_path / "store"), bad)
    assert "\n" not in str(info.value) and str(bad) in str(info.value)


def test_truncated_archive(tmp_path):
    oci_layout(tmp_path / "l", [compress(LAYER1 * 20, "none")])
    archive = _tar_dir(tmp_path / "l", tmp_path / "a.tar")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    store = ImageStore(tmp_path / "store")
    with pytest.raises(ImageError):
        load_image(store, archive)
    assert store.list() == []


def test_missing_source(tmp_path):
    with pytest.raises(NotFoundError):
        load_image(ImageStore(tmp_path / "s"), tmp_path / "nope.tar")


def test_escaping_member_names_are_refused(tmp_path):
    archive = _docker_save(tmp_path, [LAYER1], ["x"])
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    entry = json.loads(members["manifest.json"])
    entry[0]["Layers"] = ["../../../etc/passwd"]
    members["manifest.json"] = json.dumps(entry).encode()
    archive.write_bytes(layer_tar(f(name, data) for name, data in members.items()))
    with pytest.raises(ImageError, match="leaves the image"):
        load_image(ImageStore(tmp_path / "s"), archive)


def test_multi_platform_index_picks_the_host(tmp_path):
    writer = LayoutWriter()
    manifests = []
    for arch in ("arm64", "amd64"):
        blob, media_type = compress(layer_tar([f("arch", arch)]), "gzip")
        diff_id = "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest()
        cfg = {"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
        manifests.append((writer.add_image(cfg, [(blob, media_type)]), arch))
    writer.entries.clear()
    index = writer.add_blob(canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {**m.to_json(), "platform": Platform(arch, "linux").to_json()} for m, arch in manifests]}), OCI_INDEX)
    writer.add_manifest(index, ["localhost/multi:1"])
    writer.write_dir(tmp_path / "l")
    (img,) = load_image(ImageStore(tmp_path / "s"), tmp_path / "l")
    assert img.config.architecture == "amd64" and img.refs == ("localhost/multi:1",)


# -- what is read into memory is bounded (a 4 MiB config, as containers/image allows) ----------------------

BIG_LABELS = {"filler": "x" * (5 << 20)}


def test_oci_config_over_4_mib_is_refused(tmp_path):
    oci_layout(tmp_path / "l", [compress(LAYER1, "gzip")], ref="localhost/big:1",
               config={"config": {"Labels": BIG_LABELS}})
    store = ImageStore(tmp_path / "store")
    with pytest.raises(ImageError, match=r"config sha256:[0-9a-f]{64} declares \d+ bytes, more than the 4 MiB"):
        load_image(store, _tar_dir(tmp_path / "l", tmp_path / "a.tar"))
    assert store.list() == []


def test_docker_save_config_over_4_mib_is_refused(tmp_path):
    archive = _docker_save(tmp_path, [LAYER1], ["big:1"], labels=BIG_LABELS)
    store = ImageStore(tmp_path / "store")
    with pytest.raises(ImageError, match=r"\.json is larger than the 4 MiB image metadata may have"):
        load_image(store, archive)
    assert store.list() == []


def test_config_just_under_the_cap_loads(tmp_path):
    archive = _docker_save(tmp_path, [LAYER1], ["fine:1"], labels={"filler": "x" * ((4 << 20) - 4096)})
    (img,) = load_image(ImageStore(tmp_path / "store"), archive)
    assert img.config.labels["filler"].startswith("xxx")
