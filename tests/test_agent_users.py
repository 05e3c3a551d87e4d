"""Resolving --user like runc's GetExecUser, against a container's passwd and group files."""

from __future__ import annotations

from pathlib import Path

import pytest

from micropod.agent.users import ExecUser, UserError, resolve

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
alice:x:1000:1000:Alice:/home/alice:/bin/sh
nohome:x:1002:1002:::/bin/sh
"""
GROUP = """\
root:x:0:
daemon:x:1:
alice:x:1000:
devs:x:1001:bob,alice
wheel:x:10:alice
ops:x:2000:
"""


@pytest.fixture
def files(tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "passwd").write_text(PASSWD)
    (tmp_path / "group").write_text(GROUP)
    return str(tmp_path / "passwd"), str(tmp_path / "group")


@pytest.mark.parametrize(("spec", "expected"), [
    ("", ExecUser(0, 0, [], "/root")),
    ("root", ExecUser(0, 0, [], "/root")),
    ("alice", ExecUser(1000, 1000, [1001, 10], "/home/alice")),
    ("1000", ExecUser(1000, 1000, [1001, 10], "/home/alice")),
    ("alice:ops", ExecUser(1000, 2000, [1001, 10], "/home/alice")),
    ("alice:2000", ExecUser(1000, 2000, [1001, 10], "/home/alice")),
    ("alice:4242", ExecUser(1000, 4242, [1001, 10], "/home/alice")),
    ("4242", ExecUser(4242, 0, [], "/")),
    ("4242:4343", ExecUser(4242, 4343, [], "/")),
    (":ops", ExecUser(0, 2000, [], "/root")),
    ("nohome", ExecUser(1002, 1002, [], "/")),
])
def test_resolve(files: tuple[str, str], spec: str, expected: ExecUser) -> None:
    assert resolve(spec, *files) == expected


def test_unknown_user(files: tuple[str, str]) -> None:
    with pytest.raises(UserError, match=r"^unable to find user mallory: no matching entries in passwd file$"):
        resolve("mallory", *files)


def test_unknown_group(files: tuple[str, str]) -> None:
    with pytest.raises(UserError, match=r"^unable to find group nogroup: no matching entries in group file$"):
        resolve("alice:nogroup", *files)


def test_ids_out_of_range(files: tuple[str, str]) -> None:
    with pytest.raises(UserError, match="range"):
        resolve("4294967296", *files)


def test_images_without_passwd_still_run_numeric_users(tmp_path: Path) -> None:
    missing = str(tmp_path / "none")
    assert resolve("", missing, missing) == ExecUser(0, 0, [], "/")
    assert resolve("65534:65534", missing, missing) == ExecUser(65534, 65534, [], "/")
    with pytest.raises(UserError):
        resolve("nobody", missing, missing)
