"""The built-in demo image, `localhost/hello:latest`, made offline from the host's static busybox.

Every build of the same busybox gives the same bytes (fixed mtimes and owners, sorted entries, gzip
mtime 0), so the image's digest is stable and `micropod load` of it is idempotent.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

from micropod.errors import ImageError
from micropod.image.archive import LayoutWriter
from micropod.image.model import OCI_LAYER_GZIP, Platform

DEMO_REFERENCE = "localhost/hello:latest"
BUSYBOX = Path("/bin/busybox")
# 2024-01-01T00:00:00Z: a fixed time for every file and the config, so the bytes never vary.
EPOCH = 1704067200
CREATED = "2024-01-01T00:00:00Z"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

APPLETS = (
    "[", "awk", "base64", "basename", "cat", "chmod", "chown", "cp", "cut", "date", "dd", "df", "dirname",
    "du", "echo", "env", "expr", "false", "find", "free", "grep", "head", "hostname", "httpd", "id", "ip",
    "kill", "less", "ln", "ls", "md5sum", "mkdir", "mktemp", "more", "mount", "mv", "nc", "nproc",
    "nslookup", "ping", "printf", "ps", "pwd", "readlink", "rm", "rmdir", "sed", "seq", "sh", "sha256sum",
    "sleep", "sort", "stat", "sync", "tail", "tee", "test", "timeout", "top", "touch", "tr", "true",
    "umount", "uname", "uniq", "uptime", "vi", "wc", "wget", "which", "whoami", "xargs", "yes"
)

HELLO_SCRIPT = b"""\
#!/bin/sh
# The demo image's default command.
echo "Hello from micropod! This container is running inside a microVM \\
(kernel $(uname -r), $(nproc) vCPU)."
echo "Its root filesystem is a read-only squashfs with a writable ext4 overlay on top."
"""

PASSWD = b"""\
root:x:0:0:root:/root:/bin/sh
alice:x:1000:1000:Alice:/home/alice:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""

GROUP = b"""\
root:x:0:
alice:x:1000:
nogroup:x:65534:
"""


def _entry(name: str, kind: bytes, mode: int, *, size: int = 0, linkname: str = "",
           owner: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname = kind, mode, size, linkname
    info.mtime = EPOCH
    info.uid = info.gid = owner
    info.uname = info.gname = ""
    return info


def build_demo_layer(busybox: bytes) -> bytes:
    """The uncompressed layer tar."""
    files: dict[str, tuple[bytes, int]] = {
        "bin/busybox": (busybox, 0o755),
        "etc/passwd": (PASSWD, 0o644),
        "etc/group": (GROUP, 0o644),
        "etc/hostname": (b"hello\n", 0o644),
        "usr/bin/hello": (HELLO_SCRIPT, 0o755),
    }
    dirs = {"bin": 0o755, "dev": 0o755, "etc": 0o755, "home": 0o755, "home/alice": 0o755,
            "proc": 0o555, "root": 0o700, "sys": 0o555, "tmp": 0o1777, "usr": 0o755, "usr/bin": 0o755,
            "var": 0o755, "var/tmp": 0o1777}
    entries: list[tuple[str, tarfile.TarInfo, bytes | None]] = []
    for name, mode in dirs.items():
        owner = 1000 if name == "home/alice" else 0
        entries.append((name, _entry(name, tarfile.DIRTYPE, mode, owner=owner), None))
    for name, (content, mode) in files.items():
        entries.append((name, _entry(name, tarfile.REGTYPE, mode, size=len(content)), content))
    for applet in APPLETS:
        name = f"bin/{applet}"
        entries.append((name, _entry(name, tarfile.SYMTYPE, 0o777, linkname="busybox"), None))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for _, info, data in sorted(entries, key=lambda e: e[0]):
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def demo_config(diff_id: str) -> dict[str, object]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": CREATED,
        "config": {
            "Cmd": ["/usr/bin/hello"],
            "Env": [PATH_ENV],
            "WorkingDir": "/",
            "Labels": {"org.opencontainers.image.title": "micropod demo",
                       "org.opencontainers.image.description": "busybox and a greeting"},
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": CREATED, "created_by": "micropod demo image builder"}],
    }


def build_demo_image(out: Path, busybox: Path = BUSYBOX) -> Path:
    """Write the demo image as an OCI archive at `out`, ready for `micropod load -i out`."""
    try:
        binary = busybox.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read {busybox} for the demo image: {exc}",
                         hint="install busybox-static") from exc
    layer = build_demo_layer(binary)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    compressed = gzip.compress(layer, compresslevel=9, mtime=0)
    writer = LayoutWriter()
    writer.add_image(demo_config(diff_id), [(compressed, OCI_LAYER_GZIP)], [DEMO_REFERENCE],
                     platform=Platform("amd64", "linux"))
    return writer.write_archive(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m micropod.image.demo OUT``: write the demo image archive for ``micropod load``."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m micropod.image.demo OUT.tar", file=sys.stderr)
        return 2
    build_demo_image(Path(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
