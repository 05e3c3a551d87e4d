"""The CRI server over its real Unix socket, driven by a gRPC client on the generated stubs, without VMs:
runtime info, the image service over the store, the status codes of bad input, and the socket's rules."""

from __future__ import annotations

import base64
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from micropod.cri.containers import command_of
from micropod.cri.images import credentials_of
from micropod.cri.runtime_info import HandlerSettings, load_handlers
from micropod.cri.sandboxes import micropod_name, vm_size
from micropod.cri.status import CriError
from micropod.errors import UsageError
from micropod.net.dns import with_search
from tests.conftest import Cli
from tests.cri_client import CriServer, code_of, pb
from tests.registry import PASSWORD, USER, RunningRegistry


@pytest.fixture
def server(tmp_path: Path, hello_archive: Path) -> Iterator[CriServer]:
    running = CriServer.over_loaded_root(tmp_path, hello_archive)
    yield running
    running.stop()


def sandbox_config(name: str = "web", **fields: object) -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name=name, uid="uid-1", namespace="default"),
                               **fields)  # type: ignore[arg-type]


def test_version_status_and_runtime_config(server: CriServer) -> None:
    version = server.runtime.Version(pb.VersionRequest())
    assert (version.runtime_name, version.runtime_api_version) == ("micropod", "v1")
    status = server.runtime.Status(pb.StatusRequest(verbose=True))
    conditions = {c.type: c for c in status.status.conditions}
    assert set(conditions) == {"RuntimeReady", "NetworkReady"}
    assert conditions["NetworkReady"].status
    assert {h.name for h in status.runtime_handlers} >= {"", "micropod", "micropod-qemu", "micropod-firecracker"}
    config = server.runtime.RuntimeConfig(pb.RuntimeConfigRequest())
    assert config.linux.cgroup_driver == pb.CGROUPFS
    server.runtime.UpdateRuntimeConfig(pb.UpdateRuntimeConfigRequest(
        runtime_config=pb.RuntimeConfig(network_config=pb.NetworkConfig(pod_cidr="10.88.0.0/16"))))


def test_images_come_from_the_store(server: CriServer) -> None:
    listed = server.images.ListImages(pb.ListImagesRequest()).images
    assert [list(i.repo_tags) for i in listed] == [["localhost/hello:latest"]]
    image = listed[0]
    assert image.id.startswith("sha256:") and image.size > 0
    assert image.repo_digests[0].startswith("localhost/hello@sha256:")
    status = server.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image="hello"), verbose=True))
    assert status.image.id == image.id and "manifestDigest" in status.info["info"]
    by_id = server.images.ListImages(pb.ListImagesRequest(filter=pb.ImageFilter(image=pb.ImageSpec(image=image.id))))
    assert [i.id for i in by_id.images] == [image.id]
    absent = server.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image="nothere")))
    assert not absent.HasField("image")  # kubelet's "not present": no image and no error
    fs = server.images.ImageFsInfo(pb.ImageFsInfoRequest()).image_filesystems[0]
    assert fs.fs_id.mountpoint == str(server.root / "images") and fs.used_bytes.value > 0
    server.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image="nothere")))  # gone already: fine
    server.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image.id)))
    assert not server.images.ListImages(pb.ListImagesRequest()).images
    assert Cli(server.root)("images", "-q").stdout.strip() == ""


def test_pull_takes_the_auth_config_and_never_logs_it(server: CriServer, basic_registry: RunningRegistry,
                                                       hello_archive: Path) -> None:
    basic_registry.push(f"oci-archive:{hello_archive}", "pulled:latest")
    ref = f"{basic_registry.host}/pulled:latest"
    code, details = code_of(lambda: server.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref))))
    assert code == grpc.StatusCode.UNKNOWN and "authentication required" in details, details
    wrong = pb.AuthConfig(username=USER, password="not-the-password-4711")
    code, details = code_of(lambda: server.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref),
                                                                                 auth=wrong)))
    assert code == grpc.StatusCode.UNKNOWN, details
    auth = pb.AuthConfig(auth=base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
    pulled = server.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref), auth=auth))
    status = server.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)))
    assert status.image.id == pulled.image_ref
    log = server.log.read_text()
    assert "PullImage" in log  # --debug logs each call ...
    assert PASSWORD not in log and "not-the-password-4711" not in log and auth.auth not in log  # ... not secrets
    assert not (server.root / "auth.json").exists()  # a CRI credential is used once, never stored


def test_bad_input_gets_the_codes_containerd_gives(server: CriServer) -> None:
    rt = server.runtime
    unknown = "0" * 64
    assert code_of(lambda: rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=unknown)))[0] \
        == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=unknown)))[0] \
        == grpc.StatusCode.NOT_FOUND
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=unknown))  # removing what is gone succeeds
    assert code_of(lambda: rt.ContainerStatus(pb.ContainerStatusRequest(container_id=unknown)))[0] \
        == grpc.StatusCode.NOT_FOUND
    rt.RemoveContainer(pb.RemoveContainerRequest(container_id=unknown))
    code, details = code_of(lambda: rt.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=unknown, config=pb.ContainerConfig(metadata=pb.ContainerMetadata(name="c")))))
    assert code == grpc.StatusCode.NOT_FOUND and "not found" in details
    code, details = code_of(lambda: rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pb.PodSandboxConfig())))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "metadata" in details
    code, details = code_of(lambda: rt.RunPodSandbox(pb.RunPodSandboxRequest(config=sandbox_config(),
                                                                            runtime_handler="kata")))
    assert code == grpc.StatusCode.UNKNOWN and 'no runtime for "kata" is configured' in details
    code, details = code_of(lambda: rt.RunPodSandbox(pb.RunPodSandboxRequest(config=sandbox_config(
        port_mappings=[pb.PortMapping(protocol=pb.SCTP, container_port=80, host_port=8080)]))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "TCP and UDP" in details
    for sysctl, problem in (("vm.max_map_count", "not in a namespace"), ("net/../../x", "not a sysctl name")):
        code, details = code_of(lambda sysctl=sysctl: rt.RunPodSandbox(pb.RunPodSandboxRequest(  # type: ignore[misc]
            config=sandbox_config(linux=pb.LinuxPodSandboxConfig(sysctls={sysctl: "1"})))))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "invalid sysctl" in details and sysctl in details \
            and problem in details, details
    assert code_of(lambda: rt.CheckpointContainer(pb.CheckpointContainerRequest(container_id=unknown)))[0] \
        == grpc.StatusCode.UNIMPLEMENTED
    assert not rt.ListPodSandbox(pb.ListPodSandboxRequest()).items  # nothing half-made
    assert Cli(server.root)("pod", "ps", "-q").stdout.strip() == ""


def test_the_cli_s_own_pods_are_not_kubelet_s(server: CriServer) -> None:
    made = Cli(server.root)("pod", "create", "--name", "mine")
    assert made.returncode == 0, made.stderr
    assert not server.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
    mine = made.stdout.strip()
    assert code_of(lambda: server.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=mine)))[0] \
        == grpc.StatusCode.NOT_FOUND


def test_the_socket_is_root_s_alone_and_a_crashed_server_s_socket_is_replaced(server: CriServer) -> None:
    assert stat.S_IMODE(server.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(server.socket.parent.stat().st_mode) == 0o700
    second = subprocess.run([sys.executable, "-m", "micropod", "cri", "serve", "--listen", f"unix://{server.socket}",
                             "--log-file", str(server.log)], env={**os.environ, "MICROPOD_ROOT": str(server.root)},
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 125
    assert second.stderr.strip().splitlines()[-1] == f"micropod: error: {server.socket} is in use: another CRI " \
        "server listens there"
    server.stop(signal.SIGKILL)
    assert server.socket.exists()  # what a crash leaves
    server.start()
    assert server.runtime.Version(pb.VersionRequest()).runtime_name == "micropod"


def test_a_relative_or_tcp_listen_address_is_one_line(tmp_path: Path) -> None:
    for listen in ("tcp://127.0.0.1:1234", "unix://relative.sock"):
        out = subprocess.run([sys.executable, "-m", "micropod", "cri", "serve", "--listen", listen, "--log-file",
                              str(tmp_path / "log")], env={**os.environ, "MICROPOD_ROOT": str(tmp_path / "root")},
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 125
        assert out.stderr.count("\n") == 1 and out.stderr.startswith("micropod: error: invalid --listen"), out.stderr


def test_kubernetes_command_and_args_rules() -> None:
    entrypoint, cmd = ("/entry",), ("default",)
    assert command_of(entrypoint, cmd, [], []) == ("/entry", "default")
    assert command_of(entrypoint, cmd, [], ["arg"]) == ("/entry", "arg")
    assert command_of(entrypoint, cmd, ["sh"], []) == ("sh",)
    assert command_of(entrypoint, cmd, ["sh"], ["-c", "x"]) == ("sh", "-c", "x")


def test_the_vm_is_sized_by_the_pod_s_limits_and_overhead() -> None:
    linux = pb.LinuxPodSandboxConfig(
        resources=pb.LinuxContainerResources(cpu_period=100000, cpu_quota=150000, memory_limit_in_bytes=600 << 20),
        overhead=pb.LinuxContainerResources(cpu_quota=10000, memory_limit_in_bytes=100 << 20))
    assert vm_size(linux, HandlerSettings()) == (2, 700)
    assert vm_size(pb.LinuxPodSandboxConfig(), HandlerSettings(vcpus=3, memory_mib=1024)) == (3, 1024)
    tiny = pb.LinuxPodSandboxConfig(resources=pb.LinuxContainerResources(memory_limit_in_bytes=1 << 20))
    assert vm_size(tiny, HandlerSettings())[1] == 256


def test_long_reserved_names_stay_unique_and_valid() -> None:
    long_a, long_b = "a" * 120 + "_ns_uid_0", "a" * 120 + "_ns_uid_1"
    names = {micropod_name(long_a, "sandbox"), micropod_name(long_b, "sandbox")}
    assert len(names) == 2 and all(len(n) <= 128 for n in names)
    assert micropod_name("web_default_uid_0", "container") == "web_default_uid_0"


def test_runtime_handlers_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "cri.json"
    config.write_text('{"runtime_handlers": {"fast": {"vmm": "qemu", "vcpus": 2, "memory": "1G"}}}')
    assert load_handlers(config)["fast"] == HandlerSettings("qemu", 2, 1024)
    config.write_text('{"runtime_handlers": {"bad": {"vmm": "kvmtool"}}}')
    with pytest.raises(UsageError, match="vmm must be one of"):
        load_handlers(config)


def test_dns_search_and_options_replace_the_host_s() -> None:
    resolv = "nameserver 1.1.1.1\nsearch host.lan\noptions edns0\n"
    assert with_search(resolv, ("svc.cluster.local",), ("ndots:5",)) == \
        "nameserver 1.1.1.1\nsearch svc.cluster.local\noptions ndots:5\n"
    assert with_search(resolv, (), ()) == resolv
    with pytest.raises(UsageError):
        with_search(resolv, ("evil\nnameserver 6.6.6.6",), ())


def test_auth_config_forms() -> None:
    given = credentials_of(pb.AuthConfig(username="u", password="p", server_address="https://reg.example/v2"), "x")
    assert given is not None and given.get("reg.example") is not None and given.get("other.example") is None
    encoded = credentials_of(pb.AuthConfig(auth=base64.b64encode(b"u:p:q").decode()), "reg.example/img")
    assert encoded is not None and encoded.get("reg.example") is not None
    assert credentials_of(pb.AuthConfig(), "img") is None
    hub = credentials_of(pb.AuthConfig(username="u", password="p", server_address="https://index.docker.io/v1/"),
                         "busybox")
    assert hub is not None and hub.get("docker.io") is not None  # a Docker Hub secret, as kubelet passes it
    with pytest.raises(CriError, match="tokens are not supported"):
        credentials_of(pb.AuthConfig(identity_token="t"), "img")


def test_cni_args_cannot_be_smuggled_in_through_a_pod_s_metadata() -> None:
    from micropod.errors import NetworkError
    from micropod.net.cni import cni_args

    assert cni_args((("IgnoreUnknown", "1"), ("K8S_POD_NAME", "web"))) == "IgnoreUnknown=1;K8S_POD_NAME=web"
    for bad in (("K8S_POD_UID", "u;IP=10.0.0.9"), ("K8S_POD_NAME", "a=b"), ("", "x")):
        with pytest.raises(NetworkError, match="CNI argument"):
            cni_args((bad,))
