"""The fake Firecracker against the swagger: it must reject what real Firecracker rejects."""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from micropod import proc
from tests import fake_firecracker as fake


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="fcfake-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class FakeProcess:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.api_sock = workdir / "api.sock"
        self.console = workdir / "console.log"
        launcher = fake.write_launcher(workdir)
        with self.console.open("ab") as out:
            self.process = proc.spawn([launcher, "--api-sock", self.api_sock, "--id", "fake-1"],
                                      stdout=out, stderr=out)
        wait_for_socket(self.api_sock, self.process, self.console)
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.api_sock)),
                                 base_url="http://localhost", timeout=5)

    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> httpx.Response:
        if raw is not None:
            return self.http.request(method, path, content=raw)
        return self.http.request(method, path, json=body)

    def fault(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> str:
        response = self.call(method, path, body, raw)
        assert response.status_code == 400, (response.status_code, response.text)
        return str(response.json()["fault_message"])

    def ok(self, method: str, path: str, body: Any = None) -> httpx.Response:
        response = self.call(method, path, body)
        assert response.status_code in (200, 204), response.text
        return response

    def boot(self) -> None:
        kernel = self.workdir / "vmlinux"
        kernel.write_bytes(b"kernel")
        self.ok("PUT", "/boot-source", {"kernel_image_path": str(kernel), "boot_args": "console=ttyS0"})
        self.ok("PUT", "/actions", {"action_type": "InstanceStart"})

    def close(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def wait_for_socket(path: Path, process: Any, log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"fake exited {process.returncode}: {log.read_text()[-2000:]}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(path))
                    return
                except OSError:
                    pass
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    raise AssertionError(f"no API socket after {timeout}s: {log.read_text()[-2000:]}")


@pytest.fixture
def fc(short_tmp: Path) -> Iterator[FakeProcess]:
    process = FakeProcess(short_tmp)
    yield process
    process.close()


# --- The table of phases, derived from the spec text ---


def test_phase_table_is_derived_from_the_spec_text() -> None:
    swagger = fake.load_swagger()
    from_text = fake.phase_rules_from_spec(swagger)
    assert len(from_text) >= 10
    assert from_text[("PUT", "/boot-source")] == fake.PRE
    assert from_text[("PUT", "/drives/{drive_id}")] == fake.PRE
    assert from_text[("PATCH", "/drives/{drive_id}")] == fake.POST
    assert from_text[("PUT", "/vsock")] == fake.PRE
    assert from_text[("PUT", "/balloon")] == fake.PRE  # "This will fail after machine startup."
    assert ("PATCH", "/balloon") not in from_text  # "before or after machine startup"
    assert ("GET", "/") not in from_text
    table = fake.phase_table(swagger)
    assert table[("PATCH", "/vm")] == fake.POST


def test_rules_from_outside_the_spec_never_contradict_it() -> None:
    swagger = fake.load_swagger()
    from_text = fake.phase_rules_from_spec(swagger)
    operations = {(op.method, op.template) for op in fake.build_operations(swagger)}
    assert not set(fake.PHASE_RULES_NOT_IN_SPEC) & set(from_text)
    assert set(fake.PHASE_RULES_NOT_IN_SPEC) <= operations
    enum = swagger["definitions"]["InstanceActionInfo"]["properties"]["action_type"]["enum"]
    assert set(fake.ACTION_PHASES) == set(enum)


def test_other_rules_read_from_the_spec() -> None:
    swagger = fake.load_swagger()
    assert fake.required_states_from_spec(swagger) == {("PUT", "/snapshot/create"): "Paused"}
    assert ("PUT", "/metrics") in fake.once_only_from_spec(swagger)


# --- Routing and bodies ---


def test_unknown_path_is_rejected(fc: FakeProcess) -> None:
    assert "Invalid request method and/or path" in fc.fault("GET", "/no-such-thing")


def test_wrong_method_is_rejected(fc: FakeProcess) -> None:
    assert fc.fault("PUT", "/vm", {"state": "Paused"}) == "Invalid request method and/or path: PUT vm."


def test_missing_required_field(fc: FakeProcess) -> None:
    assert "'kernel_image_path' is a required property" in fc.fault("PUT", "/boot-source", {"boot_args": "x"})


def test_wrong_type(fc: FakeProcess) -> None:
    fault = fc.fault("PUT", "/machine-config", {"vcpu_count": "2", "mem_size_mib": 128})
    assert "deserializing" in fault and "'2' is not of type 'integer'" in fault
    # Swagger 2.0 is JSON Schema draft 4: 2.0 is a number, not an integer (serde agrees).
    assert "not of type 'integer'" in fc.fault("PUT", "/machine-config", {"vcpu_count": 2.0, "mem_size_mib": 128})


def test_out_of_range_and_enum(fc: FakeProcess) -> None:
    assert "is less than the minimum of 3" in fc.fault("PUT", "/vsock", {"guest_cid": 2, "uds_path": "/x"})
    assert "is not one of" in fc.fault("PUT", "/logger", {"level": "Loud"})


def test_additional_property_is_rejected(fc: FakeProcess) -> None:
    fault = fc.fault("PUT", "/entropy", {"rate": 1})
    assert "Additional properties are not allowed ('rate' was unexpected)" in fault


def test_additional_property_allowed_where_the_spec_says_so(fc: FakeProcess) -> None:
    fc.ok("PUT", "/mmds", {"anything": {"goes": True}})
    assert fc.ok("GET", "/mmds").json() == {"anything": {"goes": True}}


def test_drive_id_must_match_the_path(fc: FakeProcess, short_tmp: Path) -> None:
    disk = short_tmp / "disk"
    disk.write_bytes(b"")
    body = {"drive_id": "rootfs", "is_root_device": True, "path_on_host": str(disk), "is_read_only": True}
    assert fc.fault("PUT", "/drives/other", body) == "The id from the path does not match the id from the body!"
    fc.ok("PUT", "/drives/rootfs", body)


def test_invalid_json_and_empty_body(fc: FakeProcess) -> None:
    assert "deserializing" in fc.fault("PUT", "/boot-source", raw=b"{not json")
    assert fc.fault("PUT", "/actions", raw=b"") == "Empty PUT request."


def test_missing_files_are_refused_like_firecracker(fc: FakeProcess, short_tmp: Path) -> None:
    assert "kernel file cannot be opened" in fc.fault("PUT", "/boot-source", {"kernel_image_path": "/nope"})
    assert "Failed to open target file" in fc.fault("PUT", "/logger", {"log_path": str(short_tmp / "no.log")})


def test_second_root_drive_is_refused(fc: FakeProcess, short_tmp: Path) -> None:
    disk = short_tmp / "disk"
    disk.write_bytes(b"")
    fc.ok("PUT", "/drives/a", {"drive_id": "a", "is_root_device": True, "path_on_host": str(disk)})
    fault = fc.fault("PUT", "/drives/b", {"drive_id": "b", "is_root_device": True, "path_on_host": str(disk)})
    assert "root block device already exists" in fault


# --- Before and after boot ---


def test_post_boot_calls_before_boot(fc: FakeProcess) -> None:
    assert fc.fault("PATCH", "/vm", {"state": "Paused"}) == fake.NOT_SUPPORTED_PRE_BOOT
    assert fc.fault("PATCH", "/drives/x", {"drive_id": "x"}) == fake.NOT_SUPPORTED_PRE_BOOT
    assert fc.fault("PUT", "/actions", {"action_type": "SendCtrlAltDel"}) == fake.NOT_SUPPORTED_PRE_BOOT
    assert fc.fault("PUT", "/actions", {"action_type": "FlushMetrics"}) == fake.NOT_SUPPORTED_PRE_BOOT


def test_pre_boot_calls_after_boot(fc: FakeProcess, short_tmp: Path) -> None:
    fc.boot()
    assert fc.fault("PUT", "/boot-source", {"kernel_image_path": "/x"}) == fake.NOT_SUPPORTED_POST_BOOT
    assert fc.fault("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}) == fake.NOT_SUPPORTED_POST_BOOT
    assert fc.fault("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/x"}) == fake.NOT_SUPPORTED_POST_BOOT
    assert fc.fault("PUT", "/actions", {"action_type": "InstanceStart"}) == fake.NOT_SUPPORTED_POST_BOOT


def test_start_needs_a_kernel(fc: FakeProcess) -> None:
    assert "without kernel configuration" in fc.fault("PUT", "/actions", {"action_type": "InstanceStart"})


def test_flush_metrics_needs_metrics(fc: FakeProcess, short_tmp: Path) -> None:
    fc.boot()
    assert "metrics system was not initialized" in fc.fault("PUT", "/actions", {"action_type": "FlushMetrics"})


def test_metrics_only_once(fc: FakeProcess, short_tmp: Path) -> None:
    metrics = short_tmp / "metrics.json"
    metrics.touch()
    fc.ok("PUT", "/metrics", {"metrics_path": str(metrics)})
    assert "Reinitialization" in fc.fault("PUT", "/metrics", {"metrics_path": str(metrics)})


def test_instance_state_and_pause(fc: FakeProcess) -> None:
    assert fc.ok("GET", "/").json()["state"] == "Not started"
    fc.boot()
    assert fc.ok("GET", "/").json()["state"] == "Running"
    fc.ok("PATCH", "/vm", {"state": "Paused"})
    assert fc.ok("GET", "/").json()["state"] == "Paused"
    assert "is not one of" in fc.fault("PATCH", "/vm", {"state": "Stopped"})
    fc.ok("PATCH", "/vm", {"state": "Resumed"})
    assert fc.ok("GET", "/").json()["state"] == "Running"
    assert "booting" in fc.console.read_text()


def test_snapshot_create_needs_paused(fc: FakeProcess) -> None:
    fc.boot()
    fault = fc.fault("PUT", "/snapshot/create", {"mem_file_path": "/m", "snapshot_path": "/s"})
    assert "Paused" in fault


def test_ctrl_alt_del_powers_off(fc: FakeProcess) -> None:
    fc.boot()
    fc.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    assert fc.process.wait(10) == 0


def test_every_request_is_recorded(fc: FakeProcess) -> None:
    fc.ok("GET", "/")
    fc.fault("PUT", "/nowhere", {"x": 1})
    records = fake.read_requests(fc.api_sock)
    assert [(r["method"], r["path"], r["accepted"]) for r in records] == [
        ("GET", "/", True), ("PUT", "/nowhere", False),
    ]
    assert records[1]["body"] == {"x": 1}
    assert "Invalid request method" in records[1]["fault"]


def test_the_swagger_is_vendored_so_a_fresh_clone_needs_nothing_beside_it() -> None:
    repo = Path(__file__).resolve().parent.parent
    assert fake.default_swagger_path().is_relative_to(repo)
    assert fake.default_swagger_path().is_file()
    # Every source file of the checkout, read directly: a git grep would check nothing in an exported tree.
    pattern = re.compile(rb"\.\./shared|shared/specs")
    skipped_dirs = {".git", ".venv", "out", "build", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
    reaching = []
    for directory, subdirs, files in os.walk(repo):
        subdirs[:] = [d for d in subdirs if d not in skipped_dirs and not d.endswith(".egg-info")]
        for name in files:
            path = Path(directory, name)
            if name.endswith(".md") or path == Path(__file__).resolve():
                continue
            if pattern.search(path.read_bytes()):
                reaching.append(str(path.relative_to(repo)))
    assert reaching == [], f"files reach outside the clone: {reaching}"
