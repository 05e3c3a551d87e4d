"""ps --filter and docker's states, over records made directly in a state root (no VM needed)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from micropod.state import StateStore, VmRecord


@pytest.fixture
def root(tmp_path: Path) -> Path:
    store = StateStore(tmp_path / "state.db")
    now = time.time()
    for index, (name, status) in enumerate((("web-1", "exited"), ("web-2", "configured"), ("db", "dead"))):
        store.insert(VmRecord(id=f"{index:x}" * 64, name=name, image="hello", image_id="ab" * 32,
                              command=json.dumps(["true"]), created=now, status=status, exit_code=0))
    store.close()
    return tmp_path


def ps(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "micropod", "--root", str(root), "ps", *args],
                          capture_output=True, text=True, timeout=60)


def names(done: subprocess.CompletedProcess[str]) -> list[str]:
    assert done.returncode == 0, done.stderr
    return sorted(json.loads(line)["Names"] for line in done.stdout.splitlines())


def test_filters_by_status_name_and_id(root: Path) -> None:
    assert names(ps(root, "--format", "json", "--filter", "status=exited")) == ["web-1"]
    assert names(ps(root, "--format", "json", "-f", "status=created")) == ["web-2"]  # made by `create`
    assert names(ps(root, "--format", "json", "-a", "-f", "name=web")) == ["web-1", "web-2"]
    assert names(ps(root, "--format", "json", "-a", "-f", "name=web", "-f", "status=dead")) == []
    assert names(ps(root, "--format", "json", "-f", "status=dead", "-f", "status=exited")) == ["db", "web-1"]
    assert names(ps(root, "--format", "json", "-a", "-f", "id=222")) == ["db"]
    states = {json.loads(line)["Names"]: json.loads(line)["State"] for line in ps(root, "-a", "--format",
                                                                                 "json").stdout.splitlines()}
    assert states == {"web-1": "exited", "web-2": "created", "db": "dead"}


@pytest.mark.parametrize(("spec", "message"), [("colour=red", "use status=STATE"),
                                              ("status=up", "the status is one of")])
def test_a_bad_filter_is_one_line(root: Path, spec: str, message: str) -> None:
    done = ps(root, "--filter", spec)
    assert done.returncode == 125 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr
