"""HostNetwork: attach/detach as one unit under a lock, in network namespaces the tests create."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

from micropod.errors import MicropodError
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
    seen["inet_after_detach1"] = json.dumps(nft.listing("inet", host.owner.table))
    seen["reclaimed"] = host.reclaim(lambda vm_id: vm_id == "vm9")
    seen["final"] = (host.attachments(), [n for n in _links() if n.startswith("mp-")],
                     *(nft.listing(family, host.owner.table) for family in nft.FAMILIES))
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
    assert seen["final"] == ([], [], {"nftables": []}, {"nftables": []}, {"nftables": []})


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
            "tap": "mp-h5" in _links(), "netdev": json.dumps(nft.listing("netdev", host.owner.table))}


def test_a_failed_attach_leaves_nothing_and_keeps_the_others(tmp_path: Path) -> None:
    seen = in_fresh_netns(_failed_rules_undo, str(tmp_path))
    assert seen["error"] == "CommandError"
    assert seen["attached"] == ["vm1"] and seen["tap"] is False
    assert "mp-h1" in seen["netdev"] and "mp-h5" not in seen["netdev"]  # type: ignore[operator]


OTHER = NetworkConfig.parse("mpother0", "10.67.0.0/24")


def _ruleset() -> str:
    return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout


def _error(call: object) -> str:
    try:
        call()  # type: ignore[operator]
    except MicropodError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _two_roots(root_a: str, root_b: str) -> dict[str, object]:
    a, b = (HostNetwork(StateRoot(Path(r)).ensure()) for r in (root_a, root_b))
    seen: dict[str, object] = {}
    a.attach(vm(1, PortMapping(8080, 80)))
    theirs = VmNetwork("b1", "mp-b1", "02:00:00:00:02:01", ipaddress.IPv4Address("10.67.0.2"),
                       (PortMapping(8181, 80),), OTHER)
    b.attach(theirs)
    tables = subprocess.run(["nft", "list", "tables", "inet"], capture_output=True, text=True).stdout.split("\n")
    seen["tables"] = len({t for t in tables if t.startswith("table inet micropod")})
    # root B's last VM goes: root A's rules stay, every one of them
    b.detach("b1")
    ruleset = _ruleset()
    seen["a_kept"] = all(needle in ruleset for needle in ("ingress-mp-h1", "02:00:00:00:01:01", "10.66.0.2",
                                                          "dport 8080", "mphost0"))
    seen["b_gone"] = "mp-b1" not in ruleset and "10.67.0.2" not in ruleset
    # root B asks for root A's bridge, A's subnet on another bridge, A's published port
    seen["bridge"] = _error(lambda: b.attach(VmNetwork("b2", "mp-b2", "02:00:00:00:02:02",
                                                       ipaddress.IPv4Address("10.66.0.9"), (), NET)))
    seen["subnet"] = _error(lambda: b.attach(VmNetwork("b3", "mp-b3", "02:00:00:00:02:03",
                                                       ipaddress.IPv4Address("10.66.0.9"), (),
                                                       NetworkConfig.parse("mpother1", "10.66.0.0/24"))))
    seen["port"] = _error(lambda: b.attach(VmNetwork("b4", "mp-b4", "02:00:00:00:02:04",
                                                     ipaddress.IPv4Address("10.67.0.4"),
                                                     (PortMapping(8080, 81),), OTHER)))
    seen["b_rows"] = b.attachments()
    seen["a_intact"] = "ingress-mp-h1" in _ruleset() and [v.vm_id for v in a.attachments()] == ["vm1"]
    # once A has no VM on its bridge, the network is free for B
    a.detach("vm1")
    b.attach(VmNetwork("b5", "mp-b5", "02:00:00:00:02:05", ipaddress.IPv4Address("10.66.0.9"), (), NET))
    seen["taken_over"] = "ingress-mp-b5" in _ruleset()
    seen["a_refused_now"] = _error(lambda: a.attach(vm(1)))
    b.detach("b5")
    a.close()
    b.close()
    return seen


def test_state_roots_own_their_rules_and_networks(tmp_path: Path) -> None:
    seen = in_fresh_netns(_two_roots, str(tmp_path / "a"), str(tmp_path / "b"))
    assert seen["a_kept"], "tearing down root B's last VM removed root A's rules"
    assert seen["tables"] == 2 and seen["b_gone"], seen
    owned_by_a = f"ConflictError: bridge mphost0 belongs to the state root {(tmp_path / 'a').resolve()}"
    assert str(seen["bridge"]).startswith(owned_by_a), seen["bridge"]
    assert "collides with 10.66.0.1/24 on mphost0" in str(seen["subnet"]), seen["subnet"]
    assert seen["port"] == "ConflictError: port 8080/tcp is already published", seen["port"]
    assert seen["b_rows"] == [] and seen["a_intact"], seen
    assert seen["taken_over"], seen
    assert str(seen["a_refused_now"]).startswith("ConflictError: bridge mphost0 belongs to the state root "
                                                 f"{(tmp_path / 'b').resolve()}"), seen["a_refused_now"]
