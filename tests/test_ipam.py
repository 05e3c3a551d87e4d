import multiprocessing
from pathlib import Path

import pytest

from micropod.errors import ConflictError
from micropod.net.config import NetworkConfig
from micropod.net.ipam import Ipam

SMALL = NetworkConfig.parse("mp0", "10.9.0.0/29")  # 6 hosts: the gateway and 5 VMs


def test_lowest_free_address_after_the_gateway_and_stable_per_vm(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path / "state.db", SMALL)
    assert str(ipam.lease("a")) == "10.9.0.2"
    assert str(ipam.lease("b")) == "10.9.0.3"
    assert str(ipam.lease("a")) == "10.9.0.2"
    ipam.release("a")
    assert str(ipam.lease("c")) == "10.9.0.2"


def test_exhausted_subnet_is_a_clear_error(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path / "state.db", SMALL)
    for vm in "abcde":
        ipam.lease(vm)
    with pytest.raises(ConflictError, match=r"no free address left in 10\.9\.0\.0/29"):
        ipam.lease("f")
    assert len(ipam.leases()) == 5


def test_reclaim_frees_leases_of_vanished_vms(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path / "state.db", SMALL)
    for vm in "abc":
        ipam.lease(vm)
    assert sorted(ipam.reclaim(["b"])) == ["a", "c"]
    assert list(ipam.leases()) == ["b"]


def _lease_many(db: str, worker: int, out: "multiprocessing.Queue[list[str]]") -> None:
    ipam = Ipam(Path(db), NetworkConfig.parse("mp0", "10.10.0.0/24"))
    out.put([str(ipam.lease(f"w{worker}-{i}")) for i in range(10)])


def test_concurrent_leases_never_collide(tmp_path: Path) -> None:
    db = str(tmp_path / "state.db")
    Ipam(Path(db), SMALL).close()
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[list[str]] = ctx.Queue()
    workers = [ctx.Process(target=_lease_many, args=(db, w, out)) for w in range(8)]
    for w in workers:
        w.start()
    addresses = [ip for _ in workers for ip in out.get(timeout=60)]
    for w in workers:
        w.join(30)
    assert len(addresses) == 80 == len(set(addresses))
