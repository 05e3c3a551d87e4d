"""End to end: `cp` out of and into a real microVM under QEMU keeps files, links, hard links and modes,
and a container cannot use one copy to make the next write outside the destination."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.conftest import Cli
from tests.test_e2e_run import console_of, one_line_error, wait_for

pytestmark = pytest.mark.e2e

SETUP = ("mkdir -p /srv/t/sub && echo file > /srv/t/f && ln /srv/t/f /srv/t/hard && ln -s f /srv/t/link && "
         "echo su > /srv/t/su && chmod 4755 /srv/t/su && mkfifo /srv/t/fifo && "
         "mkdir -p /srv/data && ln -s {outside} /srv/data/sub && echo ready && exec sleep 600")


def test_cp_round_trip_and_a_planted_link_is_not_followed(cli: Cli, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    out = cli("run", "-d", "--name", "files", "hello", "sh", "-c", SETUP.format(outside=outside))
    assert out.returncode == 0, out.stderr
    wait_for(lambda: "ready" in cli("logs", "files").stdout, 60, "ready", lambda: console_of(cli, "files"))

    host = tmp_path / "host"
    host.mkdir()
    out = cli("cp", "files:/srv/t", str(host))
    assert out.returncode == 0, out.stderr
    got = host / "t"
    assert (got / "f").read_text() == "file\n" and os.readlink(got / "link") == "f"
    assert (got / "f").stat().st_ino == (got / "hard").stat().st_ino
    assert stat.S_IMODE((got / "su").stat().st_mode) == 0o755  # setuid dropped
    assert not (got / "fifo").exists() and "warning: skipped 1 " in out.stderr, out.stderr

    out = cli("cp", str(got), "files:/srv/back")
    assert out.returncode == 0, out.stderr
    listing = cli("exec", "files", "sh", "-c", "cat /srv/back/f /srv/back/hard; readlink /srv/back/link; "
                  "stat -c '%h %a %u' /srv/back/f /srv/back/su")
    assert listing.stdout == "file\nfile\nf\n2 644 0\n1 755 0\n", listing.stderr

    # The first copy brings the link data/sub -> (a host directory); the container then makes sub a
    # directory with a file in it, and the second copy must not follow the host's link.
    assert cli("cp", "files:/srv/data", str(host)).returncode == 0
    assert os.readlink(host / "data" / "sub") == str(outside)
    change = cli("exec", "files", "sh", "-c", "rm /srv/data/sub && mkdir /srv/data/sub && echo x > /srv/data/sub/x")
    assert change.returncode == 0, change.stderr
    bad = cli("cp", "files:/srv/data", str(host))
    assert bad.returncode != 0 and "data/sub" in one_line_error(bad.stderr), bad.stderr
    assert list(outside.iterdir()) == []
    assert cli("exec", "files", "true").returncode == 0  # the container still answers after a refused copy
