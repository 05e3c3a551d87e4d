"""The CLI without VMs: image commands, listings, and how bad input is reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Cli


@pytest.fixture
def plain(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "root")


def test_empty_root_lists_nothing(plain: Cli) -> None:
    out = plain("ps", "-a")
    assert out.returncode == 0
    assert out.stdout.split() == ["CONTAINER", "ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"]
    assert plain("ps", "-a", "--format", "json").stdout == ""
    assert plain("images", "-q").stdout == ""


def test_load_images_inspect_rmi(plain: Cli, hello_archive: Path) -> None:
    out = plain("load", "-i", str(hello_archive))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "Loaded image: localhost/hello:latest\n"
    listing = plain("images")
    assert "localhost/hello" in listing.stdout and "latest" in listing.stdout
    [row] = [json.loads(line) for line in plain("images", "--format", "json").stdout.splitlines()]
    assert row["Repository"] == "localhost/hello" and row["Tag"] == "latest"
    [info] = json.loads(plain("inspect", "hello").stdout)
    assert info["RepoTags"] == ["localhost/hello:latest"]
    assert info["Config"]["Cmd"] == ["/usr/bin/hello"]
    assert info["Id"] == f"sha256:{row['ID']}"
    again = plain("load", "-i", str(hello_archive))
    assert again.returncode == 0
    removed = plain("rmi", "hello")
    assert removed.returncode == 0, removed.stderr
    assert "Untagged: localhost/hello:latest" in removed.stdout
    assert plain("images", "-q").stdout == ""
    assert not any(p.is_file() for p in (plain.root / "images" / "blobs" / "sha256").iterdir())


@pytest.mark.parametrize("args,code,needle", [
    (["rm", "nope"], 1, "No such container: nope"),
    (["stop", "nope"], 1, "No such container: nope"),
    (["logs", "nope"], 125, "No such container: nope"),
    (["inspect", "nope"], 1, "No such object: nope"),
    (["rmi", "nope"], 1, "No such image: nope"),
    (["run", "--rm", "nope"], 125, "No such image: nope"),
    (["run", "--rm", "UPPER"], 125, "invalid reference format"),
    (["run", "--memory", "12q", "x"], 125, "--memory"),
    (["run", "-p", "80:80:90", "x"], 125, "invalid port spec '80:80:90'"),
    (["run", "-p", "0:80", "x"], 125, "is not a port number"),
    (["run", "-p", "80:80/sctp", "x"], 125, "protocol must be tcp or udp"),
    (["run", "--network", "host", "x"], 125, "invalid --network 'host'"),
    (["run", "--network", "none", "-p", "80:80", "x"], 125, "--network none has no network"),
    (["run", "--dns", "dns.google", "x"], 125, "invalid --dns 'dns.google'"),
    (["stop", "-t", "-1", "x"], 125, "negative"),
])
def test_bad_input_is_one_line_without_traceback(plain: Cli, args: list[str], code: int, needle: str) -> None:
    out = plain(*args)
    assert out.returncode == code, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_rm_force_of_missing_is_quiet_success(plain: Cli) -> None:
    out = plain("rm", "-f", "nope")
    assert out.returncode == 0 and out.stderr == ""


def test_load_of_garbage_is_one_line(plain: Cli, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all")
    out = plain("load", "-i", str(junk))
    assert out.returncode == 125
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert plain("images", "-q").stdout == ""


def test_debug_shows_the_traceback(plain: Cli) -> None:
    out = plain("--debug", "run", "--rm", "nope")
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_doctor_reports_each_check(plain: Cli) -> None:
    out = plain("doctor", "--format", "json")
    checks = {c["check"]: c for c in map(json.loads, out.stdout.splitlines())}
    assert {"qemu", "kvm", "firecracker", "tar2sqfs", "mkfs.ext4", "nft", "tun", "network", "state root"} <= set(checks)
    assert checks["qemu"]["ok"]
    if Path("/sys/module/kvm_pvm").exists():
        assert not checks["kvm"]["ok"] and "kvm_pvm" in checks["kvm"]["detail"]
