"""Image-to-rootfs time: `micropod image unpack` (flatten the layers into tar2sqfs, no extraction)
against `umoci unpack` followed by `mksquashfs` of the unpacked rootfs, same image, same compressor
(zstd level 3) and all CPUs on both sides; medians of alternating runs, ratio micropod / (umoci +
mksquashfs). The image is the pull benchmark's (about 200 MB of layer data in 6 gzip layers), pulled
from the same local registry; umoci reads the OCI layout it was pushed from (the same blobs).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.pull import TAG, image_size, micropod_argv, shared_image
from bench.timing import comparison, time_command
from micropod import proc

RUNS = 5


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="micropod-bench-unpack-") as tmp_name:
        tmp = Path(tmp_name)
        layout, ref = shared_image()
        root = tmp / "root"
        proc.run(micropod_argv(root, "pull", "-q", ref), timeout=300)
        image_id = proc.run(micropod_argv(root, "images", "-q")).stdout.decode().split()[0]
        ours, umoci, mksquashfs = [], [], []
        for i in range(RUNS):
            for cached in (root / "rootfs").glob("*.sqfs"):
                cached.unlink()
            ours.append(time_command(micropod_argv(root, "image", "unpack", image_id)))
            bundle, sqfs = tmp / f"bundle{i}", tmp / f"umoci{i}.sqfs"
            umoci.append(time_command(["umoci", "unpack", "--image", f"{layout}:{TAG}", str(bundle)]))
            mksquashfs.append(time_command(["mksquashfs", str(bundle / "rootfs"), str(sqfs), "-noappend", "-quiet",
                                            "-no-progress", "-comp", "zstd", "-Xcompression-level", "3"]))
            shutil.rmtree(bundle)
            sqfs.unlink()
        baseline = [u + m for u, m in zip(umoci, mksquashfs, strict=True)]
        return comparison(("micropod_unpack", ours), ("umoci_plus_mksquashfs", baseline),
                          image_bytes=image_size(layout), umoci_median_s=round(statistics.median(umoci), 3),
                          mksquashfs_median_s=round(statistics.median(mksquashfs), 3),
                          target=0.45, goal=0.3)  # issue 14's


if __name__ == "__main__":
    start = time.monotonic()
    print(json.dumps(run(), indent=2))
    print(f"({time.monotonic() - start:.1f}s)", file=sys.stderr)
