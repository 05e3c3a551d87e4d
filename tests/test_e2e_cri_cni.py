"""Sandbox networking through CNI, with Debian's real plugins (bridge, host-local, portmap) in a namespace the
test made: the sandbox's VM takes the address CNI gave, is reached on it, and through a port mapping from
another namespace; CNI DEL runs once per sandbox, however the sandbox ends."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cli, require_guest
from tests.cri_client import CriServer, pb
from tests.nettopo import HOST_IP, Topology, topology
from tests.test_e2e_run import wait_for

pytestmark = pytest.mark.e2e

BOOT = 240
PLUGINS = Path("/usr/lib/cni")
SUBNET = ipaddress.IPv4Network("10.77.0.0/24")
HOST_PORT = 18080
LISTENER = """
import socket, sys
server = socket.create_server(("0.0.0.0", 9000))
while True:
    conn, peer = server.accept()
    with open(sys.argv[1], "a") as out:
        out.write(peer[0] + "\\n")
    conn.close()
"""


def logging_plugins(bin_dir: Path, calls: Path) -> None:
    """bridge and portmap as themselves, each call recorded first (host-local, which bridge calls, is found
    by CNI_PATH in the real directory)."""
    bin_dir.mkdir()
    for name in ("bridge", "portmap"):
        plugin = bin_dir / name
        plugin.write_text(f'#!/bin/sh\necho "$CNI_COMMAND {name} $CNI_CONTAINERID" >> {calls}\n'
                          f'exec {PLUGINS / name}\n')
        plugin.chmod(0o755)


def network_conf(conf_dir: Path, ipam_dir: Path) -> None:
    conf_dir.mkdir()
    (conf_dir / "10-pods.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "pods", "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": str(SUBNET)}]], "routes": [{"dst": "0.0.0.0/0"}],
                      "dataDir": str(ipam_dir)}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ]}))


@pytest.fixture
def world(tmp_path: Path, hello_archive: Path) -> Iterator[tuple[CriServer, Topology, Path]]:
    require_guest()
    if not (PLUGINS / "bridge").exists():
        pytest.skip("containernetworking-plugins is not installed")
    calls = tmp_path / "cni-calls"
    logging_plugins(tmp_path / "bin", calls)
    network_conf(tmp_path / "net.d", tmp_path / "ipam")
    with topology() as topo:
        server = CriServer.over_loaded_root(
            tmp_path, hello_archive, wrapper=("ip", "netns", "exec", topo.host),
            extra=("--cni-conf-dir", str(tmp_path / "net.d"), "--cni-bin-dir", str(tmp_path / "bin"),
                   "--cni-bin-dir", str(PLUGINS)))
        root = server.root
        try:
            yield server, topo, calls
        finally:
            server.stop()
            cli = Cli(root)
            left = cli("pod", "ps", "-q", "--no-trunc").stdout.split()
            if left:
                cli("pod", "rm", "-f", *left, timeout=120)


def sandbox(name: str, logs: Path, **fields: object) -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="default"),
                               hostname=name, log_directory=str(logs), **fields)  # type: ignore[arg-type]


def calls_for(calls: Path, sid: str) -> list[str]:
    lines = calls.read_text().splitlines() if calls.exists() else []
    return [line.rsplit(" ", 1)[0] for line in lines if line.endswith(sid)]


def fetch(topo: Topology, netns: str, url: str) -> subprocess.CompletedProcess[str]:
    return topo.run(netns, "curl", "-s", "--max-time", "10", url)


def test_a_sandbox_takes_its_address_from_cni_and_del_runs_once(world: tuple[CriServer, Topology, Path],
                                                                tmp_path: Path) -> None:
    server, topo, calls = world
    rt = server.runtime
    ready = {c.type: c for c in rt.Status(pb.StatusRequest()).status.conditions}
    assert ready["NetworkReady"].status and "CNI network 'pods'" in ready["NetworkReady"].message

    logs = tmp_path / "logs"
    (logs / "web").mkdir(parents=True)
    config = sandbox("web", logs, port_mappings=[pb.PortMapping(protocol=pb.TCP, container_port=8080,
                                                                host_port=HOST_PORT)])
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=BOOT).pod_sandbox_id
    assert calls_for(calls, sid) == ["ADD bridge", "ADD portmap"]
    ip = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid)).status.network.ip
    assert ipaddress.IPv4Address(ip) in SUBNET, ip

    serve = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="web"), image=pb.ImageSpec(image="hello"), log_path="web/0.log",
        command=["sh", "-c", "mkdir -p /tmp/www && echo served-by-the-pod > /tmp/www/index.html && "
                             "exec httpd -f -p 8080 -h /tmp/www"])
    web = rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, sandbox_config=config,
                                                       config=serve)).container_id
    rt.StartContainer(pb.StartContainerRequest(container_id=web), timeout=BOOT)
    inside = rt.ExecSync(pb.ExecSyncRequest(container_id=web, cmd=["ip", "-4", "addr", "show", "eth0"], timeout=30),
                         timeout=60)
    assert f"inet {ip}/{SUBNET.prefixlen}" in inside.stdout.decode(), inside

    def served(netns: str, url: str) -> bool:
        return fetch(topo, netns, url).stdout == "served-by-the-pod\n"

    wait_for(lambda: served(topo.host, f"http://{ip}:8080/"), 60, "the pod's server on its CNI address",
             server.log_tail)
    # the port mapping, through the portmap plugin's rules, from a namespace with no route to the pods
    wait_for(lambda: served(topo.outside, f"http://{HOST_IP}:{HOST_PORT}/"), 60, "the pod through its host port",
             server.log_tail)

    # What the guest sends reaches the network only from the address CNI gave (and its MAC).
    peers = tmp_path / "peers"
    listener = topo.spawn(topo.host, sys.executable, "-c", LISTENER, str(peers))
    try:
        admin = rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=config, config=pb.ContainerConfig(
                metadata=pb.ContainerMetadata(name="admin"), image=pb.ImageSpec(image="hello"),
                command=["sleep", "3600"], log_path="web/admin.log", linux=pb.LinuxContainerConfig(
                    security_context=pb.LinuxContainerSecurityContext(
                        capabilities=pb.Capability(add_capabilities=["NET_ADMIN"])))))).container_id
        rt.StartContainer(pb.StartContainerRequest(container_id=admin), timeout=BOOT)

        def connect_out() -> None:
            rt.ExecSync(pb.ExecSyncRequest(container_id=admin, cmd=["sh", "-c", f"nc -w 3 {gateway} 9000 </dev/null"],
                                           timeout=30), timeout=60)

        gateway = SUBNET.network_address + 1
        wait_for(lambda: connect_out() or (peers.exists() and ip in peers.read_text()), 60,
                 "a connection from the pod's own address", server.log_tail)
        spoofed = SUBNET.network_address + 200
        rt.ExecSync(pb.ExecSyncRequest(container_id=admin, cmd=["sh", "-c", (
            f"ip addr flush dev eth0 && ip addr add {spoofed}/{SUBNET.prefixlen} dev eth0 && "
            f"ip route add default via {gateway}")], timeout=30), timeout=60)
        for _ in range(3):
            connect_out()
        assert str(spoofed) not in peers.read_text()
    finally:
        listener.kill()
        listener.wait(10)

    verbose = json.loads(rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True))
                         .info["info"])["cri"]
    netns_file = Path(verbose["netns"])
    assert verbose["network"] == "cni" and netns_file.exists()
    # what falls through the TAP's filters meets a stack that routes nothing (the host's forwarding is not copied)
    # (the namespace's file is mounted in the server's own mount namespace: entered through the pod's monitor,
    # which runs in it; its VMM has a network namespace of its own in its jail, with nothing but its descriptors)
    monitor = json.loads(Cli(server.root)("pod", "inspect", sid).stdout)[0]["VM"]["MonitorPid"]
    seen = subprocess.run(["nsenter", "-t", str(monitor), "-n", "cat", "/proc/sys/net/ipv4/conf/all/forwarding",
                           "/proc/sys/net/ipv6/conf/tap0/disable_ipv6", "/proc/sys/net/ipv4/conf/tap0/arp_ignore"],
                          capture_output=True, text=True, timeout=30)
    assert seen.stdout.split() == ["0", "1", "8"], seen
    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    assert calls_for(calls, sid) == ["ADD bridge", "ADD portmap", "DEL portmap", "DEL bridge"]
    assert not netns_file.exists()
    veths = topo.run(topo.host, "ip", "-o", "link", "show", "type", "veth").stdout
    assert "uplink0" in veths and len(veths.splitlines()) == 1, veths  # the pod's veth went with DEL

    # A sandbox removed behind the server's back (the CLI, or a crash) is torn down at the next listing.
    other = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=sandbox("gone", logs)), timeout=BOOT).pod_sandbox_id
    assert Cli(server.root)("pod", "rm", "-f", other, timeout=120).returncode == 0
    assert calls_for(calls, other) == ["ADD bridge", "ADD portmap"]
    assert not rt.ListPodSandbox(pb.ListPodSandboxRequest()).items
    rt.ListPodSandbox(pb.ListPodSandboxRequest())
    assert calls_for(calls, other) == ["ADD bridge", "ADD portmap", "DEL portmap", "DEL bridge"]
