"""HostNetwork: attach/detach as one unit under a lock, in network namespaces the tests create."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

from micropod.net import nft
from micropod.net.config import NetworkConfig
from micropod.net.host import HostNetwork
from micropod.net.nft import VmNetwork
from micropod.net.ports import PortMapping
from micropod.paths import StateRoot
from tests.netns import in_fresh_netns

NET = NetworkConfig.parse("mphost0", "10.66.0.0/24")


def vm(n: int, *ports: PortMapping) -> VmNetwork:
    return VmNetwork(f"vm{n}", f"mp-h{n}", f"02:00:00:00:01:{n:02x}", ipaddress.IPv4Address(f"10.66.0.{n + 1}"), ports,
                     NET)


def _links() -> list[str]:
    out = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True).stdout
    return [link["ifname"] for link in json.loads(out)]


def _lifecycle(root_dir: str) -> dict[str, object]:
    root = StateRoot(Path(root_dir)).ensure()
    host = HostNetwork(root)
    seen: dict[str, object] = {}
    host.attach(vm(1, PortMapping(8080, 80)))
    host.attach(vm(2))
    host.attach(vm(2))  # again (a restarted monitor): replaced, not doubled
    seen["attached"] = [a.vm_id for a in host.attachments()]
    seen["links"] = _links()
    try:
        host.attach(vm(3, PortMapping(8080, 80)))
    except Exception as exc:
        seen["clash"] = str(exc)
    seen["after_clash"] = ([a.vm_id for a in host.attachments()], "mp-h3" in _links())
    seen["detach1"] = host.detach("vm1")
    seen["detach1_again"] = host.detach("vm1")
    seen["inet_after_detach1"] = json.dumps(nft.listing("inet"))
    seen["reclaimed"] = host.reclaim(lambda vm_id: vm_id == "vm9")
    seen["final"] = (host.attachments(), [n for n in _links() if n.startswith("mp-")], nft.listing("inet"),
                     nft.listing("netdev"))
    host.close()
    return seen


def test_attach_detach_reclaim(tmp_path: Path) -> None:
    seen = in_fresh_netns(_lifecycle, str(tmp_path))
    assert seen["attached"] == ["vm1", "vm2"]
    assert {"mphost0", "mp-h1", "mp-h2"} <= set(seen["links"])  # type: ignore[arg-type]
    assert seen["clash"] == "port 8080/tcp is already published"
    assert seen["after_clash"] == (["vm1", "vm2"], False)
    assert seen["detach1"] is True and seen["detach1_again"] is False
    assert "10.66.0.2" not in seen["inet_after_detach1"] and "10.66.0.3" not in seen["inet_after_detach1"]
    assert seen["reclaimed"] == ["vm2"]
    assert seen["final"] == ([], [], {"nftables": []}, {"nftables": []})


def _failed_rules_undo(root_dir: str) -> dict[str, object]:
    root = StateRoot(Path(root_dir)).ensure()
    host = HostNetwork(root)
    host.attach(vm(1))
    bad = VmNetwork("vm5", "mp-h5", "not-a-mac", ipaddress.IPv4Address("10.66.0.6"), (), NET)
    try:
        host.attach(bad)
        error = "attached"
    except Exception as exc:
        error = type(exc).__name__
    return {"error": error, "attached": [a.vm_id for a in host.attachments()],
            "tap": "mp-h5" in _links(), "netdev": json.dumps(nft.listing("netdev"))}


def test_a_failed_attach_leaves_nothing_and_keeps_the_others(tmp_path: Path) -> None:
    seen = in_fresh_netns(_failed_rules_undo, str(tmp_path))
    assert seen["error"] == "CommandError"
    assert seen["attached"] == ["vm1"] and seen["tap"] is False
    assert "mp-h1" in seen["netdev"] and "mp-h5" not in seen["netdev"]  # type: ignore[operator]
