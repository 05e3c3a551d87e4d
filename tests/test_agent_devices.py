"""Devices of the VM's own kernel given to a container (micropod/agent/devices.py), and their refusals."""

from __future__ import annotations

import os

import pytest

from micropod.agent import bundle, devices
from micropod.cli.mounts import parse_device
from micropod.errors import UsageError
from micropod.runconfig import DeviceMapping


@pytest.mark.parametrize(("path", "target", "access", "problem"), [
    ("/dev/vda", "/dev/vda", "rw", "cannot be passed into a microVM"),  # the container's own disks
    ("/dev/vport0p1", "/dev/x", "rw", "cannot be passed into a microVM"),  # the host channel
    ("/dev/ttyS0", "/dev/ttyS0", "rw", "cannot be passed into a microVM"),  # the console
    ("/dev/fuse", "fuse", "rwm", "is not a path under /dev"),
    ("/dev/fuse", "/dev/../etc/x", "rwm", "is not a path under /dev"),
    ("/dev/fuse", "/run/micropod-agent.sock", "rwm", "is not a path under /dev"),
    ("/dev/fuse", "/dev/fuse", "rwx", "not a combination of r, w and m"),
    ("/dev/fuse", "/dev/fuse", "", "not a combination of r, w and m"),
])
def test_only_the_vms_own_virtual_devices_can_be_given(path: str, target: str, access: str, problem: str) -> None:
    assert problem in devices.check_request(path, target, access)
    with pytest.raises(devices.DeviceError, match=problem.split(":")[0]):
        devices.oci_devices([{"path": path, "container_path": target, "permissions": access}])


def test_docker_s_device_syntax() -> None:
    assert parse_device("/dev/fuse") == DeviceMapping("/dev/fuse", "/dev/fuse", "rwm")
    assert parse_device("/dev/net/tun:/dev/tun0") == DeviceMapping("/dev/net/tun", "/dev/tun0", "rwm")
    assert parse_device("/dev/net/tun:rw") == DeviceMapping("/dev/net/tun", "/dev/net/tun", "rw")
    assert parse_device("/dev/fuse:/dev/fuse:r") == DeviceMapping("/dev/fuse", "/dev/fuse", "r")
    with pytest.raises(UsageError, match="cannot be passed into a microVM"):
        parse_device("/dev/sda")


@pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="needs the TUN driver's node")
def test_a_device_becomes_a_node_and_a_cgroup_rule_for_what_was_asked() -> None:
    nodes, rules = devices.oci_devices([{"path": "/dev/net/tun", "container_path": "/dev/net/tun",
                                         "permissions": "rw"}])
    assert nodes == [{"path": "/dev/net/tun", "type": "c", "major": 10, "minor": 200, "fileMode": 0o666,
                      "uid": 0, "gid": 0}]
    assert rules == [{"allow": True, "type": "c", "major": 10, "minor": 200, "access": "rw"}]
    document = bundle.config("c1", "/rootfs", {"args": ["true"]}, {"devices": [
        {"path": "/dev/net/tun", "container_path": "/dev/net/tun", "permissions": "rw"}]})
    assert document["linux"]["devices"] == nodes and document["linux"]["resources"]["devices"] == rules
    assert "devices" not in bundle.config("c1", "/rootfs", {"args": ["true"]}, {})["linux"]
