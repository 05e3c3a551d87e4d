"""Pull time: `micropod pull` into a fresh root against `skopeo copy docker://... oci:DIR`, both from the
same local docker-registry on 127.0.0.1 (shared with the unpack benchmark), medians of alternating
runs; the ratio is micropod / skopeo. Each micropod pull starts from an empty state root.

The image is built offline with a fixed seed: about 200 MB of layer data in 6 gzip layers, part random
and part repetitive text, so it compresses somewhat as real layers do.
"""

from __future__ import annotations

import atexit
import gzip
import hashlib
import io
import json
import random
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.timing import comparison, time_command
from micropod import proc

SEED = 20261122
LAYERS = 6
FILES_PER_LAYER = 12
FILE_SIZE = 3 << 20  # 6 layers x 12 files x ~3 MiB = ~216 MiB uncompressed
RUNS = 5
TAG = "bench"


def _file_data(rng: random.Random, size: int) -> bytes:
    """Half random bytes, half repetitive text: compresses to roughly 60%."""
    words = [rng.randbytes(rng.randint(3, 9)).hex() for _ in range(64)]
    text = " ".join(rng.choice(words) for _ in range(size // 12)).encode()[: size // 2]
    return rng.randbytes(size - len(text)) + text


def build_image(dest: Path) -> Path:
    """Write the benchmark image as an OCI layout at `dest` with ref name `bench`."""
    rng = random.Random(SEED)
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}", len(data)

    layers, diff_ids = [], []
    for index in range(LAYERS):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            directory = tarfile.TarInfo(f"data{index}")
            directory.type, directory.mode, directory.mtime = tarfile.DIRTYPE, 0o755, 1700000000
            tar.addfile(directory)
            for n in range(FILES_PER_LAYER):
                data = _file_data(rng, FILE_SIZE + rng.randint(0, 1 << 16))
                info = tarfile.TarInfo(f"data{index}/file{n}.bin")
                info.size, info.mode, info.mtime = len(data), 0o644, 1700000000
                tar.addfile(info, io.BytesIO(data))
        diff_ids.append("sha256:" + hashlib.sha256(raw.getvalue()).hexdigest())
        digest, size = put(gzip.compress(raw.getvalue(), compresslevel=1, mtime=0))
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size})
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    config_digest, config_size = put(config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": config_digest, "size": config_size},
                           "layers": layers}).encode()
    manifest_digest, manifest_size = put(manifest)
    image_index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
        "size": manifest_size, "annotations": {"org.opencontainers.image.ref.name": TAG}}]}
    (dest / "index.json").write_text(json.dumps(image_index))
    (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return dest


def image_size(layout: Path) -> int:
    return sum(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir())


def micropod_argv(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "micropod", "--root", str(root), *args]


_shared: tuple[Path, str] | None = None


def shared_image() -> tuple[Path, str]:
    """(OCI layout, registry reference) of the benchmark image, built and pushed once per process to a
    local docker-registry that lives until the process exits, so both benchmarks use the same one."""
    global _shared
    if _shared is None:
        from tests.registry import start_registry

        tmp = tempfile.TemporaryDirectory(prefix="micropod-bench-image-")
        layout = build_image(Path(tmp.name) / "layout")
        registry = start_registry(Path(tmp.name) / "registry")
        atexit.register(tmp.cleanup)
        atexit.register(registry.stop)
        proc.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{TAG}",
                  f"docker://{registry.host}/bench:latest"], timeout=300)
        _shared = layout, f"{registry.host}/bench:latest"
    return _shared


def run() -> dict[str, Any]:
    layout, ref = shared_image()
    with tempfile.TemporaryDirectory(prefix="micropod-bench-pull-") as tmp_name:
        tmp = Path(tmp_name)
        ours, theirs = [], []
        for i in range(RUNS):
            root, target = tmp / f"root{i}", tmp / f"skopeo{i}"
            ours.append(time_command(micropod_argv(root, "pull", "-q", ref)))
            theirs.append(time_command(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                                        f"docker://{ref}", f"oci:{target}:{TAG}"]))
            shutil.rmtree(root)
            shutil.rmtree(target)
    return comparison(("micropod_pull", ours), ("skopeo_copy", theirs),
                      image_bytes=image_size(layout), layers=LAYERS, target=0.8, goal=0.6)  # issue 14


if __name__ == "__main__":
    start = time.monotonic()
    print(json.dumps(run(), indent=2))
    print(f"({time.monotonic() - start:.1f}s)", file=sys.stderr)
