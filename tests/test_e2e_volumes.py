"""Named volumes in real VMs: an ext4 disk per volume, attached at boot, bound into the container by the
agent (micropod/volumes.py, micropod/agent/volumes.py)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tests.conftest import Cli

pytestmark = pytest.mark.e2e

WAIT = 300


def test_data_in_a_named_volume_outlives_its_container_and_ro_refuses_writes(cli: Cli) -> None:
    first = cli("run", "--name", "writer", "-v", "data:/data", "hello", "sh", "-c",
                "ls -A /data; echo kept > /data/file; grep ' /data ' /proc/mounts", timeout=WAIT)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("/dev/vd") and " ext4 rw," in first.stdout, first.stdout  # and empty
    assert cli("rm", "writer").returncode == 0
    second = cli("run", "--rm", "--mount", "type=volume,source=data,target=/srv/d", "hello", "cat", "/srv/d/file",
                 timeout=WAIT)
    assert (second.returncode, second.stdout) == (0, "kept\n"), second.stderr
    read_only = cli("run", "--rm", "-v", "data:/data:ro", "hello", "sh", "-c",
                    "cat /data/file; echo no > /data/file", timeout=WAIT)
    assert read_only.returncode != 0 and read_only.stdout == "kept\n", read_only.stdout
    assert "Read-only file system" in read_only.stderr, read_only.stderr


def test_a_new_volume_is_filled_from_the_image_at_its_path(cli: Cli) -> None:
    seen = cli("run", "--rm", "-v", "etc-copy:/etc", "hello", "sh", "-c", "ls /etc; grep -c root /etc/passwd",
               timeout=WAIT)
    assert seen.returncode == 0, seen.stderr
    assert {"passwd", "group"} <= set(seen.stdout.split()) and "lost+found" not in seen.stdout, seen.stdout


def test_a_volume_in_use_is_neither_removed_nor_attached_twice(cli: Cli) -> None:
    held = cli("run", "-d", "--name", "holder", "-v", "shared:/data", "hello", "sleep", "300", timeout=WAIT)
    assert held.returncode == 0, held.stderr
    refused = cli("volume", "rm", "shared")
    assert refused.returncode != 0 and "volume is in use" in refused.stderr, refused.stderr
    second = cli("run", "--rm", "-v", "shared:/data", "hello", "true", timeout=WAIT)
    assert second.returncode == 125, second.stderr
    assert second.stderr.strip().splitlines()[-1].endswith("a volume is attached to one running VM at a time")
    assert cli("rm", "-f", "holder", timeout=120).returncode == 0
    removed = cli("volume", "rm", "shared")
    assert (removed.returncode, removed.stdout) == (0, "shared\n"), removed.stderr
    assert not (cli.root / "volumes" / "shared").exists()
    assert cli("volume", "ls", "-q").stdout == ""


@pytest.mark.parametrize(("option", "message"), [
    ("./dir:/x", "a host directory must be given as an absolute path"),
    ("data:relative", "the container path 'relative' must be absolute"),
    ("bad/name:/x", "invalid volume name \"bad/name\""),
    ("data:/x:rx", "the mode 'rx' is not ro or rw"),
])
def test_bad_volume_options_are_one_line_before_any_vm_boots(cli: Cli, option: str, message: str) -> None:
    done = cli("run", "--rm", "-v", option, "hello", "true")
    assert done.returncode == 125 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert cli("ps", "-aq").stdout == "" and cli("volume", "ls", "-q").stdout == ""


def test_read_only_root_with_a_tmpfs_and_a_volume_as_docker(cli: Cli) -> None:
    script = ("touch /x 2>/dev/null; echo root $?; touch /tmp/t 2>/dev/null; echo tmp $?; "
              "touch /scratch/f && echo scratch 0; echo v > /data/v && echo volume 0; grep ' /scratch ' /proc/mounts")
    seen = cli("run", "--rm", "--read-only", "--tmpfs", "/scratch:size=8m", "-v", "rw-data:/data", "hello",
               "sh", "-c", script, timeout=WAIT)
    assert seen.returncode == 0, seen.stderr
    lines = seen.stdout.splitlines()
    assert lines[:4] == ["root 1", "tmp 1", "scratch 0", "volume 0"], lines
    assert "rw,nosuid,nodev,noexec" in lines[4] and "size=8192k" in lines[4], lines  # docker's defaults, then ours


def test_a_bind_mount_shares_a_host_directory_and_the_host_never_gets_a_guests_link_device_or_setuid(
        cli: Cli, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "from-host").write_text("host\n")
    script = ("cat /h/from-host; echo guest > /h/from-guest; chmod 4755 /h/from-guest; "
              "ln -s /etc/shadow /h/link; mknod /h/null c 1 3; ls -l /h/link | cut -c1")
    seen = cli("run", "--rm", "-v", f"{shared}:/h", "hello", "sh", "-c", script, timeout=WAIT)
    assert (seen.returncode, seen.stdout) == (0, "host\nl\n"), seen.stderr  # the guest sees its own link
    assert (shared / "from-guest").read_text() == "guest\n"
    for name in ("from-guest", "link", "null"):  # mapped-xattr: plain private files on the host
        st = (shared / name).lstat()
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, (name, oct(st.st_mode))
    read_only = cli("run", "--rm", "--mount", f"type=bind,source={shared},target=/h,readonly", "hello",
                    "sh", "-c", "cat /h/from-host; touch /h/new", timeout=WAIT)
    assert read_only.returncode != 0 and read_only.stdout == "host\n" and not (shared / "new").exists()
    missing = cli("run", "--rm", "-v", f"{tmp_path / 'missing'}:/h", "hello", "true")
    assert missing.returncode == 125 and "bind source path does not exist" in missing.stderr, missing.stderr
    assert missing.stderr.count("\n") == 1 and cli("ps", "-aq").stdout == ""


def test_create_then_start_as_docker(cli: Cli) -> None:
    made = cli("create", "--name", "later", "-v", "later-data:/d", "hello", "sh", "-c",
               "cat /d/count 2>/dev/null || echo none; echo once > /d/count")
    assert made.returncode == 0 and len(made.stdout.strip()) == 64, made.stderr
    mounts = json.loads(cli("inspect", "later").stdout)[0]["Mounts"]
    assert [(m["Type"], m["Name"], m["Destination"], m["RW"]) for m in mounts] == [("volume", "later-data", "/d", True)]
    listed = cli("ps", "-a", "--filter", "name=later", "--format", "json")
    assert json.loads(listed.stdout)["State"] == "created" and "Created" in json.loads(listed.stdout)["Status"]
    first = cli("start", "-a", "later", timeout=WAIT)
    assert (first.returncode, first.stdout) == (0, "none\n"), first.stderr
    again = cli("start", "-a", "later", timeout=WAIT)
    assert (again.returncode, again.stdout) == (0, "once\n"), again.stderr
    assert cli("rm", "later").returncode == 0
