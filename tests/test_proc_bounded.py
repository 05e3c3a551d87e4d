"""proc.run with output_limit: a program's output is read as it comes and bounded (CNI plugins, cni.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from micropod import proc
from micropod.errors import CommandError, NetworkError
from micropod.net.cni import MAX_OUTPUT, Attachment, Cni, NetworkConf


def test_a_program_that_prints_without_end_is_killed_at_the_limit() -> None:
    started = time.monotonic()
    with pytest.raises(CommandError, match="printed more than 65536 bytes"):
        proc.run(["yes"], output_limit=1 << 16, timeout=30)
    assert time.monotonic() - started < 10  # killed, not waited for


def test_input_output_and_the_exit_code_come_back_whole() -> None:
    data = b"x" * (3 << 20)  # more than a pipe holds: the input is written as the output is read
    done = proc.run(["cat"], input=data, output_limit=4 << 20, check=False)
    assert (done.returncode, done.stdout) == (0, data)
    failed = proc.run(["sh", "-c", "echo out; echo err >&2; exit 3"], output_limit=100, check=False)
    assert (failed.returncode, failed.stdout, failed.stderr) == (3, b"out\n", b"err\n")


def test_only_the_tail_of_stderr_is_kept_and_a_timeout_is_one_error() -> None:
    noisy = proc.run(["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x >&2; echo end >&2"], output_limit=10,
                     check=False)
    assert len(noisy.stderr) <= proc.STDERR_KEPT + (1 << 16) and noisy.stderr.endswith(b"xend\n")
    with pytest.raises(CommandError, match="timed out"):
        proc.run(["sleep", "5"], output_limit=10, timeout=0.3)


def test_a_cni_plugin_that_floods_its_result_is_one_clear_error(tmp_path: Path) -> None:
    plugin = tmp_path / "flood"
    plugin.write_text("#!/bin/sh\ncat > /dev/null\nexec yes '{}'\n")
    plugin.chmod(0o755)
    conf = NetworkConf.from_json({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "flood"}]}, "test")
    cni = Cni(bin_dirs=(tmp_path,), timeout=30)
    with pytest.raises(NetworkError, match=f"printed more than {MAX_OUTPUT} bytes"):
        cni.add(conf, Attachment("c" * 64, tmp_path / "netns"))
    assert json.dumps(cni.calls).count("ADD flood") == 1
