"""The Firecracker backend, booted against the swagger-checking fake (tests/fake_firecracker.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from micropod import wire
from micropod.errors import BootError, FirecrackerApiError, VmmError
from micropod.vmm import firecracker_api as api
from micropod.vmm.base import AGENT_VSOCK_PORT, GUEST_CID, Drive, NetInterface, VmSpec
from micropod.vmm.firecracker import FirecrackerVmm, JailerConfig, find_firecracker, find_jailer
from micropod.vmm.firecracker_config import VmmLayout, build_config
from tests import fake_firecracker as fake

VM_ID = "0123456789ab" + "c" * 52


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="fcvmm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def guest_dir(short_tmp: Path) -> Path:
    path = short_tmp / "guest"
    path.mkdir()
    return path


@pytest.fixture
def spec(short_tmp: Path) -> VmSpec:
    images = short_tmp / "images"
    images.mkdir()
    for name in ("vmlinux", "rootfs.sqfs", "system.sqfs", "upper.ext4"):
        (images / name).write_bytes(b"\0" * 512)
    return VmSpec(
        vm_id=VM_ID,
        kernel=images / "vmlinux",
        cmdline="console=ttyS0 reboot=k panic=1",
        vcpus=2,
        memory_mib=256,
        drives=(
            Drive("system", images / "system.sqfs", read_only=True, is_root=True),
            Drive("image", images / "rootfs.sqfs", read_only=True),
            Drive("upper", images / "upper.ext4", read_only=False),
        ),
        run_dir=short_tmp / "run",
        console_log=short_tmp / "run" / "console.log",
        nets=(NetInterface("eth0", "mp-tap0", "02:fc:00:00:00:01"),),
    )


@pytest.fixture
def launcher(short_tmp: Path, guest_dir: Path) -> Path:
    bin_dir = short_tmp / "bin"
    bin_dir.mkdir()
    return fake.write_launcher(bin_dir, {"FAKE_FC_GUEST_DIR": str(guest_dir)})


@pytest.fixture
def vmm(spec: VmSpec, launcher: Path) -> Iterator[FirecrackerVmm]:
    machine = FirecrackerVmm(spec, launcher)
    yield machine
    machine.kill()


class Guest:
    """A stand-in for the guest agent: a listener on the fake's guest side of the vsock."""

    def __init__(self, guest_dir: Path, port: int = AGENT_VSOCK_PORT) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(guest_dir / f"vsock_{port}.sock"))
        self.listener.listen(1)
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        # The host may hang up after the hello; that is its right, not the guest's failure.
        with conn, contextlib.suppress(OSError):
            conn.sendall(wire.encode_control({"op": "hello", "version": wire.VERSION}))
            conn.settimeout(10)
            self.received = conn.recv(1024)
            if self.received:
                conn.sendall(b"echo:" + self.received)

    def close(self) -> None:
        self.listener.close()


def read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    reader = wire.FrameReader()
    sock.settimeout(10)
    while True:
        data = sock.recv(4096)
        assert data, "channel closed before a whole frame"
        frames = reader.feed(data)
        if frames:
            return frames[0]


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "channel closed early"
        data += chunk
    return data


# --- Request bodies are the swagger's definitions ---


def test_request_bodies_match_swagger_definitions() -> None:
    definitions = fake.load_swagger()["definitions"]
    for body in api.REQUEST_BODIES:
        definition = definitions[body.__name__]
        fields = dataclasses.fields(body)
        names = {f.name for f in fields}
        assert names <= set(definition["properties"]), body.__name__
        mandatory = {f.name for f in fields if f.default is dataclasses.MISSING}
        assert set(definition.get("required", ())) <= mandatory, body.__name__


def test_to_json_omits_unset_fields() -> None:
    drive = api.Drive("d", is_root_device=False, path_on_host="/x", rate_limiter=api.RateLimiter(
        bandwidth=api.TokenBucket(size=1, refill_time=100)))
    assert api.to_json(drive) == {
        "drive_id": "d", "is_root_device": False, "path_on_host": "/x",
        "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 100}},
    }
    assert api.to_json(api.MmdsConfig(network_interfaces=("eth0",))) == {"network_interfaces": ["eth0"]}


def test_build_config_follows_the_spec(spec: VmSpec) -> None:
    config = build_config(spec, VmmLayout(spec.run_dir, jailed=False))
    assert config.boot_source == api.BootSource(str(spec.kernel), boot_args=spec.cmdline)
    assert config.machine == api.MachineConfiguration(vcpu_count=2, mem_size_mib=256, smt=False)
    assert [(d.drive_id, d.is_root_device, d.is_read_only) for d in config.drives] == [
        ("system", True, True), ("image", False, True), ("upper", False, False),
    ]
    assert config.nets == (api.NetworkInterface("eth0", "mp-tap0", "02:fc:00:00:00:01"),)
    # a bare name: firecracker runs in the VM's directory, keeping sockets within sun_path's limit
    assert config.vsock == api.Vsock(guest_cid=GUEST_CID, uds_path="vsock.sock")


# --- Booting the fake ---


def test_boots_the_fake_with_valid_requests_in_order(vmm: FirecrackerVmm, spec: VmSpec) -> None:
    vmm.start()
    records = fake.read_requests(vmm.api_socket)
    assert all(r["accepted"] for r in records), [r for r in records if not r["accepted"]]
    assert [(r["method"], r["path"]) for r in records] == [
        ("PUT", "/logger"), ("PUT", "/metrics"), ("PUT", "/boot-source"), ("PUT", "/machine-config"),
        ("PUT", "/drives/system"), ("PUT", "/drives/image"), ("PUT", "/drives/upper"),
        ("PUT", "/network-interfaces/eth0"), ("PUT", "/vsock"), ("PUT", "/entropy"), ("PUT", "/actions"),
    ]
    assert records[-1]["body"] == {"action_type": "InstanceStart"}
    assert records[2]["body"] == {"kernel_image_path": str(spec.kernel), "boot_args": spec.cmdline}
    assert vmm.pid is not None
    with api.FirecrackerClient(vmm.api_socket) as client:
        info = client.get_instance_info()
        assert (info.state, info.id) == ("Running", VM_ID[:12])
        assert client.get_machine_config().vcpu_count == 2
    assert "booting" in spec.console_log.read_text()


def test_argv_without_jailer(vmm: FirecrackerVmm, spec: VmSpec, launcher: Path) -> None:
    assert vmm.argv() == [str(launcher), "--api-sock", "api.sock", "--id", VM_ID[:12]]


def test_restart_over_stale_sockets(spec: VmSpec, launcher: Path) -> None:
    first = FirecrackerVmm(spec, launcher)
    first.start()
    first.kill()
    second = FirecrackerVmm(spec, launcher)
    try:
        second.start()  # the first run's api.sock and vsock.sock are still on disk
    finally:
        second.kill()


# --- Faults ---


def test_fault_for_a_pre_boot_call_after_boot(vmm: FirecrackerVmm, spec: VmSpec) -> None:
    vmm.start()
    with api.FirecrackerClient(vmm.api_socket) as client, pytest.raises(FirecrackerApiError) as caught:
        client.put_boot_source(api.BootSource(str(spec.kernel)))
    assert caught.value.status == 400
    assert caught.value.fault == fake.NOT_SUPPORTED_POST_BOOT
    assert "PUT /boot-source: 400: The requested operation is not supported after" in str(caught.value)


def test_fault_for_a_post_boot_call_before_boot(short_tmp: Path, launcher: Path) -> None:
    from tests.test_fake_firecracker import FakeProcess

    process = FakeProcess(short_tmp)
    try:
        with api.FirecrackerClient(process.api_sock) as client:
            with pytest.raises(FirecrackerApiError) as caught:
                client.pause()
            assert caught.value.fault == fake.NOT_SUPPORTED_PRE_BOOT
            with pytest.raises(FirecrackerApiError) as caught:
                client.patch_drive(api.PartialDrive("rootfs", path_on_host="/x"))
            assert caught.value.fault == fake.NOT_SUPPORTED_PRE_BOOT
            with pytest.raises(FirecrackerApiError, match="deserializing") as caught:
                client.request("PUT", "/machine-config", {"vcpu_count": "two", "mem_size_mib": 128})
            assert caught.value.status == 400
    finally:
        process.close()


def test_fault_during_start_stops_the_process(spec: VmSpec, launcher: Path) -> None:
    broken = dataclasses.replace(spec, kernel=spec.kernel.with_name("missing-vmlinux"))
    machine = FirecrackerVmm(broken, launcher)
    with pytest.raises(FirecrackerApiError, match="kernel file cannot be opened"):
        machine.start()
    assert machine.wait(0) is not None


def test_api_client_translates_connection_errors(short_tmp: Path) -> None:
    with api.FirecrackerClient(short_tmp / "nobody.sock") as client, pytest.raises(VmmError) as caught:
        client.get_instance_info()
    assert not isinstance(caught.value, FirecrackerApiError)
    assert "cannot talk to the API socket" in str(caught.value)


def test_child_that_dies_at_start_gives_boot_error_with_its_output(spec: VmSpec, short_tmp: Path) -> None:
    crashing = fake.write_launcher(short_tmp, {"FAKE_FC_CRASH": "Error creating the KVM fd: permission denied"})
    machine = FirecrackerVmm(spec, crashing)
    with pytest.raises(BootError) as caught:
        machine.start()
    message = str(caught.value)
    assert "exited with code 1" in message
    assert "Error creating the KVM fd: permission denied" in message


# --- The agent channel over hybrid vsock ---


def test_connect_agent_through_hybrid_vsock(vmm: FirecrackerVmm, guest_dir: Path) -> None:
    guest = Guest(guest_dir)
    vmm.start()
    with vmm.connect_agent(timeout=10) as channel:
        kind, stream, payload = read_frame(channel)
        assert (kind, stream) == (wire.CONTROL, 0)
        assert wire.decode_control(payload) == {"op": "hello", "version": wire.VERSION}
        channel.sendall(b"ping")
        assert recv_exactly(channel, 9) == b"echo:ping"
    guest.close()


def test_connect_agent_retries_until_the_guest_listens(
    vmm: FirecrackerVmm, guest_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vmm.start()
    attempts: list[str] = []
    guests: list[Guest] = []
    original = vmm._vsock_connect

    def attempt(port: int, timeout: float) -> socket.socket:
        try:
            return original(port, timeout)
        except OSError as exc:
            attempts.append(str(exc))
            if len(attempts) == 2:
                guests.append(Guest(guest_dir))  # the agent comes up after two refusals
            raise

    monkeypatch.setattr(vmm, "_vsock_connect", attempt)
    with vmm.connect_agent(timeout=10) as channel:
        assert wire.decode_control(read_frame(channel)[2])["op"] == "hello"
    assert len(attempts) == 2
    assert all("refused" in a for a in attempts)
    guests[0].close()


def test_connect_agent_times_out_with_the_console_tail(vmm: FirecrackerVmm) -> None:
    vmm.start()
    with pytest.raises(BootError) as caught:
        vmm.connect_agent(timeout=0.5)
    message = str(caught.value)
    assert f"did not answer on vsock port {AGENT_VSOCK_PORT} within 0.5s" in message
    assert "fake-firecracker" in message  # the console tail


def test_connect_agent_notices_a_dead_vmm(vmm: FirecrackerVmm) -> None:
    vmm.start()
    assert vmm._proc is not None
    vmm._proc.kill()
    vmm._proc.wait(10)
    with pytest.raises(BootError, match="exited with code -9 while connecting"):
        vmm.connect_agent(timeout=5)


# --- Control ---


def test_pause_and_resume(vmm: FirecrackerVmm) -> None:
    vmm.start()
    with api.FirecrackerClient(vmm.api_socket) as client:
        vmm.pause()
        assert client.get_instance_info().state == "Paused"
        vmm.resume()
        assert client.get_instance_info().state == "Running"
    sent = [r["body"] for r in fake.read_requests(vmm.api_socket) if r["path"] == "/vm"]
    assert sent == [{"state": "Paused"}, {"state": "Resumed"}]


def test_firecrackers_own_log_and_metrics_are_named_pipes_copied_into_capped_files(
        vmm: FirecrackerVmm, spec: VmSpec) -> None:
    """A file Firecracker appends to itself, for as long as the guest keeps it logging, would have no cap."""
    vmm.start()
    bodies = {r["path"]: r["body"] for r in fake.read_requests(vmm.api_socket)}
    assert bodies["/logger"]["log_path"] == "vmm.log.fifo"
    assert bodies["/metrics"]["metrics_path"] == "metrics.fifo"
    with api.FirecrackerClient(vmm.api_socket) as client:
        client.flush_metrics()
    vmm.stop()
    assert vmm.wait(10) == 0
    vmm.settle_logs()
    root = spec.run_dir
    assert all(stat.S_ISFIFO((root / name).lstat().st_mode) for name in ("vmm.log.fifo", "metrics.fifo"))
    assert "Running Firecracker" in vmm.vmm_log.read_text()
    assert "utc_timestamp_ms" in (root / "metrics.json").read_text()
    for name in ("vmm.log", "metrics.json"):
        assert stat.S_IMODE((root / name).lstat().st_mode) == 0o600


def test_stop_sends_ctrl_alt_del_and_the_process_exits(vmm: FirecrackerVmm) -> None:
    vmm.start()
    vmm.stop()
    assert vmm.wait(10) == 0
    assert fake.read_requests(vmm.api_socket)[-1]["body"] == {"action_type": "SendCtrlAltDel"}
    vmm.stop()  # already gone: nothing to do


def test_kill(vmm: FirecrackerVmm) -> None:
    vmm.start()
    assert vmm.wait(0) is None
    vmm.kill()
    assert vmm.wait(0) == -9


def test_patch_drive_after_boot(vmm: FirecrackerVmm, spec: VmSpec) -> None:
    vmm.start()
    replacement = spec.drives[2].path.with_name("container2.ext4")
    replacement.write_bytes(b"")
    vmm.patch_drive("upper", replacement)
    last = fake.read_requests(vmm.api_socket)[-1]
    assert (last["method"], last["path"], last["accepted"]) == ("PATCH", "/drives/upper", True)
    assert last["body"] == {"drive_id": "upper", "path_on_host": str(replacement)}


# --- The jailer ---


def test_jailer_argv(spec: VmSpec, launcher: Path, short_tmp: Path) -> None:
    jailer = JailerConfig(binary=Path("/usr/bin/jailer"), uid=123, gid=100, chroot_base=short_tmp / "jail",
                          netns=Path("/var/run/netns/mp"), cgroup_version=2)
    machine = FirecrackerVmm(spec, launcher, jailer)
    assert machine.argv() == [
        "/usr/bin/jailer", "--id", VM_ID[:12], "--exec-file", str(launcher), "--uid", "123", "--gid", "100",
        "--chroot-base-dir", str(short_tmp / "jail"), "--netns", "/var/run/netns/mp", "--cgroup-version", "2",
        "--", "--api-sock", "/api.sock",
    ]
    root = short_tmp / "jail" / "firecracker" / VM_ID[:12] / "root"
    assert machine.api_socket == root / "api.sock"
    assert machine.config.boot_source.kernel_image_path == "/vmlinux"
    assert [d.path_on_host for d in machine.config.drives] == ["/drive-system", "/drive-image", "/drive-upper"]
    assert machine.config.vsock.uds_path == "/vsock.sock"


def test_boots_through_the_jailer(spec: VmSpec, launcher: Path, short_tmp: Path, guest_dir: Path) -> None:
    jailer_bin = fake.write_launcher(short_tmp / "bin", {"FAKE_FC_AS_JAILER": "1"}, name="jailer")
    jail = JailerConfig(binary=jailer_bin, uid=os.getuid(), gid=os.getgid(), chroot_base=short_tmp / "jail")
    machine = FirecrackerVmm(spec, launcher, jail)
    guest = Guest(guest_dir)
    try:
        machine.start()
        root = short_tmp / "jail" / "firecracker" / VM_ID[:12] / "root"
        assert (root / "vmlinux").samefile(spec.kernel)
        assert (root / "drive-upper").samefile(spec.drives[2].path)
        records = fake.read_requests(root / "api.sock")
        assert all(r["accepted"] for r in records)
        assert records[2]["body"]["kernel_image_path"] == "/vmlinux"
        with machine.connect_agent(timeout=10) as channel:
            assert wire.decode_control(read_frame(channel)[2])["op"] == "hello"
    finally:
        machine.kill()
        guest.close()
    assert not (short_tmp / "jail" / "firecracker" / VM_ID[:12]).exists()
    assert spec.kernel.exists()


# --- Finding the binaries ---


def test_find_firecracker_prefers_the_environment(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = short_tmp / "my-firecracker"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("MICROPOD_FIRECRACKER", str(binary))
    assert find_firecracker() == binary
    monkeypatch.setenv("MICROPOD_JAILER", str(binary))
    assert find_jailer() == binary


def test_find_firecracker_on_path(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = short_tmp / "firecracker"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.delenv("MICROPOD_FIRECRACKER", raising=False)
    monkeypatch.setenv("PATH", str(short_tmp))
    assert find_firecracker() == binary
    binary.chmod(0o644)  # not executable: not a candidate
    assert find_firecracker() in (None, Path("/usr/local/bin/firecracker"))


def test_a_socket_name_the_vmm_replaced_by_a_link_is_never_connected_to(spec: VmSpec, launcher: Path,
                                                                        short_tmp: Path) -> None:
    machine = FirecrackerVmm(spec, launcher)
    machine.spec.run_dir.mkdir(parents=True, exist_ok=True)
    elsewhere = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    elsewhere.bind(str(short_tmp / "host-service.sock"))
    try:
        machine.api_socket.symlink_to(short_tmp / "host-service.sock")
        with pytest.raises(VmmError, match="is not the socket firecracker made"):
            machine._pinned(machine.api_socket)
    finally:
        elsewhere.close()


def test_mmds_v2_is_configured_before_boot_and_renewed_after(spec: VmSpec, launcher: Path) -> None:
    """The spec-checking fake validates PUT /mmds/config (V2, the VM's NIC), PUT /mmds and PATCH /mmds."""
    tree = {"latest": {"meta-data": {"instance-id": VM_ID}, "credentials": {"jwt": "first"}}}
    machine = FirecrackerVmm(dataclasses.replace(spec, mmds=tree), launcher)
    try:
        machine.start()
        machine.patch_mmds({"latest": {"credentials": {"jwt": "second"}}})
        records = fake.read_requests(machine.api_socket)
        assert all(r["accepted"] for r in records), [r for r in records if not r["accepted"]]
        calls = [(r["method"], r["path"]) for r in records]
        assert calls.index(("PUT", "/mmds/config")) < calls.index(("PUT", "/mmds")) < calls.index(("PUT", "/actions"))
        assert records[calls.index(("PUT", "/mmds/config"))]["body"] == {"network_interfaces": ["eth0"],
                                                                        "version": "V2"}
        assert records[-1]["method"] == "PATCH" and records[-1]["path"] == "/mmds"
        state = machine._api().request("GET", "/mmds")
        assert state == {"latest": {"meta-data": {"instance-id": VM_ID}, "credentials": {"jwt": "second"}}}
    finally:
        machine.kill()


def test_no_nic_no_mmds(spec: VmSpec) -> None:
    config = build_config(dataclasses.replace(spec, nets=(), mmds={"latest": {}}), VmmLayout(spec.run_dir, False))
    assert config.mmds_config is None and config.mmds is None
