"""The pure parts of starting a container process: PATH lookup, environment, /etc files."""

from __future__ import annotations

from pathlib import Path

import pytest

from micropod.agent import process
from micropod.agent.launch import DEFAULT_PATH, Launch, LaunchError, build_env, etc_files
from micropod.agent.process import look_path


def test_look_path(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "tool").write_text("")  # not executable: skipped, like Go's LookPath
    (tmp_path / "b" / "tool").write_text("")
    (tmp_path / "b" / "tool").chmod(0o755)
    path = f"{tmp_path}/a:{tmp_path}/b"
    assert look_path("tool", path) == f"{tmp_path}/b/tool"
    with pytest.raises(LaunchError) as info:
        look_path("other", path)
    assert (info.value.code, info.value.message) == (127, 'exec: "other": executable file not found in $PATH')
    with pytest.raises(LaunchError) as info:
        look_path(f"{tmp_path}/a/tool", path)
    assert info.value.code == 126 and info.value.message.endswith("permission denied")
    with pytest.raises(LaunchError) as info:
        look_path(f"{tmp_path}/a", path)
    assert info.value.code == 126
    with pytest.raises(LaunchError) as info:
        look_path(f"{tmp_path}/none", path)
    assert info.value.code == 127
    assert info.value.message == f'exec: "{tmp_path}/none": stat {tmp_path}/none: no such file or directory'


def test_env_defaults_and_overrides() -> None:
    launch = Launch("/r", {"args": ["x"], "env": ["PATH=/opt/bin", "A=1=2", "NOEQUALS", "HOME=/h"],
                           "hostname": "box", "tty": True}, is_exec=False)
    assert build_env(launch, "/root") == {"PATH": "/opt/bin", "HOSTNAME": "box", "TERM": "xterm",
                                          "A": "1=2", "HOME": "/h"}
    plain = Launch("/r", {"args": ["x"]}, is_exec=True)
    assert build_env(plain, "/home/u") == {"PATH": DEFAULT_PATH, "HOME": "/home/u"}


def test_etc_files() -> None:
    assert etc_files({"hostname": "box", "resolv_conf": "nameserver 1.1.1.1\n"}) == {
        "/etc/hostname": "box\n",
        "/etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tbox\n",
        "/etc/resolv.conf": "nameserver 1.1.1.1\n",
    }
    assert etc_files({"hosts": "10.0.0.2 c\n"}) == {"/etc/hosts": "10.0.0.2 c\n"}


def test_exec_differs_from_run() -> None:
    run = Launch("/r", {"args": ["x"], "hostname": "h"}, is_exec=False)
    exec_ = Launch("/r", {"args": ["x"], "hostname": "h"}, is_exec=True)
    assert (run.make_cwd, run.user_error_code, bool(run.etc_files)) == (True, 125, True)
    assert (exec_.make_cwd, exec_.user_error_code, exec_.etc_files) == (False, 126, {})


def test_no_command() -> None:
    with pytest.raises(LaunchError) as info:
        process.spawn(Launch("/r", {"args": []}, is_exec=False))
    assert info.value.code == 125
