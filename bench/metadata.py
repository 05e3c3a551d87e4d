"""The metadata service from inside the guest (issue 13's benchmark): a session token and one GET through the
VM's TAP to its server on the gateway, against the same two HTTP requests to a busybox httpd on the guest's
own loopback, both timed by the guest (/proc/uptime around a loop), in a network namespace made for the purpose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.timing import comparison

RUNS = int(os.environ.get("BENCH_RUNS", "7"))
LOOP = 20  # request pairs per sample: /proc/uptime counts hundredths of a second
TOKEN_PUT = "printf 'PUT /latest/api/token HTTP/1.0\\r\\nX-metadata-token-ttl-seconds: 60\\r\\n\\r\\n'"
METADATA = (f"T=$({TOKEN_PUT} | nc 169.254.169.254 80 | tail -n1); "
            "printf 'GET /latest/meta-data/instance-id HTTP/1.0\\r\\nX-metadata-token: %s\\r\\n\\r\\n' \"$T\" "
            "| nc 169.254.169.254 80 >/dev/null")
LOCAL = ("T=$(printf 'GET /token HTTP/1.0\\r\\n\\r\\n' | nc 127.0.0.1 8080 | tail -n1); "
         "printf 'GET /token HTTP/1.0\\r\\nX-token: %s\\r\\n\\r\\n' \"$T\" | nc 127.0.0.1 8080 >/dev/null")


def _loop(body: str) -> str:
    return (f"read s _ < /proc/uptime; i=0; while [ $i -lt {LOOP} ]; do {body}; i=$((i+1)); done; "
            "read e _ < /proc/uptime; echo $s $e")


def _per_pair(cli: list[str], env: dict[str, str], body: str) -> float:
    out = subprocess.run([*cli, "exec", "bench-md", "sh", "-c", _loop(body)], env=env, capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"the guest's loop failed: {out.stderr.strip()[-300:]}")
    start, end = (float(x) for x in out.stdout.split()[-2:])
    return (end - start) / LOOP


def run() -> dict[str, Any]:
    from micropod.image.demo import build_demo_image
    from tests.nettopo import topology

    serve = "mkdir -p /www && echo local-token > /www/token && httpd -p 127.0.0.1:8080 -h /www && exec sleep 3600"
    with tempfile.TemporaryDirectory(prefix="micropod-bench-md-") as tmp, topology() as topo:
        env = dict(os.environ, MICROPOD_ROOT=str(Path(tmp) / "root"), MICROPOD_SNAPSHOT_DIR=str(Path(tmp) / "snap"))
        env.pop("MICROPOD_NETWORK", None)
        env.pop("MICROPOD_DEBUG", None)
        cli = [*topo.argv(topo.host), sys.executable, "-m", "micropod"]
        archive = build_demo_image(Path(tmp) / "hello.oci.tar")
        subprocess.run([*cli, "load", "-q", "-i", str(archive)], env=env, check=True, capture_output=True)
        subprocess.run([*cli, "run", "-d", "--name", "bench-md", "hello", "sh", "-c", serve], env=env, check=True,
                       capture_output=True, timeout=300)
        try:
            _per_pair(cli, env, METADATA)  # warm: the credential key, the guest's caches
            _per_pair(cli, env, LOCAL)
            ours, base = [], []
            for _ in range(RUNS):
                ours.append(_per_pair(cli, env, METADATA))
                base.append(_per_pair(cli, env, LOCAL))
        finally:
            subprocess.run([*cli, "rm", "-f", "bench-md"], env=env, capture_output=True, timeout=120)
    return comparison(("token_and_get", ours), ("guest_loopback_pair", base), digits=4, requests_per_sample=LOOP)


if __name__ == "__main__":
    json.dump(run(), sys.stdout, indent=2)
    sys.stdout.write("\n")
