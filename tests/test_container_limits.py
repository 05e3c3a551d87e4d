"""A container's cgroup limits and sysctls without a VM: what the agent makes of limits at creation and on an
update, what `update` may change, the CRI's LinuxContainerResources both ways, and which sysctls go where."""

from __future__ import annotations

from typing import Any

import pytest

from micropod.agent.bundle import SecurityError, limits
from micropod.cri.api import pb
from micropod.cri.containers import limits_of, resources_message
from micropod.cri.status import CriError
from micropod.errors import UsageError
from micropod.runconfig import ContainerSpec, RunConfig
from micropod.service.update import UpdateRequest, changed_in_pod

MIB = 1 << 20


def test_at_creation_zero_is_no_limit_and_each_limit_is_its_cgroup_s() -> None:
    assert limits(ContainerSpec(args=("true",), env=()).limits(), updating=False) == {}
    spec = ContainerSpec(args=("true",), env=(), pids_limit=20, memory_limit=64 * MIB, cpu_quota=0.5, cpu_shares=512,
                         cpuset_cpus="0", cpuset_mems="0")
    assert limits(spec.limits(), updating=False) == {
        "pids": {"limit": 20}, "memory": {"limit": 64 * MIB},
        "cpu": {"quota": 50000, "period": 100000, "shares": 512, "cpus": "0", "mems": "0"}}


def test_an_update_changes_only_what_it_names_and_zero_lifts_a_limit() -> None:
    """The single-container VM's monitor sends pids_limit alone: nothing else of the cgroup may move."""
    assert limits({"id": "main", "pids_limit": 30}, updating=True) == {"pids": {"limit": 30}}
    lifted = limits({"pids_limit": 0, "memory_limit": 0, "cpu_quota": 0, "cpu_shares": 0, "cpuset_cpus": ""},
                    updating=True)
    assert lifted == {"pids": {"limit": -1}, "memory": {"limit": -1}, "cpu": {"quota": -1, "period": 100000}}
    # a tiny quota still gets the kernel's least (1 ms a period)
    assert limits({"cpu_quota": 0.001}, updating=True)["cpu"]["quota"] == 1000


@pytest.mark.parametrize("message", [
    {"memory_limit": -5}, {"memory_limit": True}, {"memory_limit": "64m"}, {"pids_limit": 1 << 62},
    {"cpu_quota": 2000}, {"cpu_quota": "1"}, {"cpu_quota": -1}, {"cpuset_cpus": 3}, {"cpuset_mems": "0," * 200},
    {"cpu_shares": 1.5},
])
def test_the_agent_refuses_limits_of_the_wrong_type_or_range(message: dict[str, Any]) -> None:
    with pytest.raises(SecurityError):
        limits(message, updating=True)


def pod_member(**spec: Any) -> RunConfig:
    return RunConfig(vm_id="a" * 64, name="n", image="hello", image_id="b" * 64, backend="qemu", kernel="/k",
                     system="/s", rootfs="/r", vcpus=1, memory_mib=256,
                     container=ContainerSpec(args=("true",), env=(), **spec))


def test_update_of_a_pod_s_container_changes_its_cgroup_limits() -> None:
    cfg = pod_member(memory_limit=64 * MIB, cpu_quota=0.5)
    new = changed_in_pod(cfg, UpdateRequest(memory="96m", cpus="0.25", cpu_shares=256, cpuset_cpus="1",
                                            pids_limit=40, restart="always"), vcpus=2)
    spec = new.container
    assert (spec.memory_limit, spec.cpu_quota, spec.cpu_shares, spec.cpuset_cpus, spec.pids_limit) == (
        96 * MIB, 0.25, 256, "1", 40)
    assert new.restart.name == "always" and (new.vcpus, new.memory_mib) == (cfg.vcpus, cfg.memory_mib)
    exact = changed_in_pod(cfg, UpdateRequest(memory_limit=0, cpu_quota=8.0), vcpus=2).container
    assert (exact.memory_limit, exact.cpu_quota) == (0, 2.0)  # none; no more than the VM's vCPUs


@pytest.mark.parametrize(("request_", "problem"), [
    (UpdateRequest(memory_reservation="32m"), "the VM's quotas belong to the pod"),
    (UpdateRequest(network_rate=MIB), "the VM's quotas belong to the pod"),
    (UpdateRequest(cpuset_cpus="2"), "the pod's VM has no 2 \\(it has 0-1\\)"),
    (UpdateRequest(cpuset_mems="1"), "invalid cpuset_mems '1': the pod's VM has no 1"),
    (UpdateRequest(cpuset_cpus="1-0"), "runs backwards"),
    (UpdateRequest(memory="1k"), "at least"),
    (UpdateRequest(cpu_shares=1), "from 2 to 262144"),
])
def test_update_of_a_pod_s_container_refuses_what_is_not_its_own(request_: UpdateRequest, problem: str) -> None:
    with pytest.raises(UsageError, match=problem):
        changed_in_pod(pod_member(), request_, vcpus=2)


def test_the_cri_s_resources_become_limits_and_come_back_in_the_status() -> None:
    given = pb.LinuxContainerResources(cpu_period=200000, cpu_quota=50000, cpu_shares=1, memory_limit_in_bytes=MIB,
                                       cpuset_cpus="0", cpuset_mems="0")
    request = limits_of("c", given)
    assert request == UpdateRequest(memory_limit=MIB, cpu_quota=0.25, cpu_shares=2, cpuset_cpus="0",
                                    cpuset_mems="0")  # shares at least 2, as the kernel's cgroup v1 floor
    # none given: no limit, but a cpuset given as "" is left as it is, as containerd leaves it
    assert limits_of("c", pb.LinuxContainerResources(cpu_quota=-1, memory_limit_in_bytes=-1)) == UpdateRequest(
        memory_limit=0, cpu_quota=0.0, cpu_shares=0, cpuset_cpus=None, cpuset_mems=None)
    spec = changed_in_pod(pod_member(), request, vcpus=1).container
    reported = resources_message(spec).linux
    assert (reported.cpu_quota, reported.cpu_period, reported.memory_limit_in_bytes, reported.cpu_shares) == (
        25000, 100000, MIB, 2)
    with pytest.raises(CriError, match="unified"):
        limits_of("c", pb.LinuxContainerResources(unified={"memory.max": "1"}))


def test_sysctls_split_into_the_container_s_own_and_the_pod_network_s() -> None:
    from micropod.agent.bundle import config, sysctls

    spec = {"sysctls": {"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "20",
                        "net.ipv4.ip_local_port_range": "20000 30000"}}
    own, network = sysctls(spec)
    assert own == {"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "20"}
    assert network == {"net.ipv4.ip_local_port_range": "20000 30000"}
    document = config("c", "/root", {"args": ["true"]}, spec)
    assert document["linux"]["sysctl"] == own  # the runtime checks them against the container's namespaces
    assert "sysctl" not in config("c", "/root", {"args": ["true"]}, {})["linux"]


@pytest.mark.parametrize("given", [
    {"vm.max_map_count": "1"}, {"kernel.hostname": "x"}, {"net/../../x": "1"}, {"net.core.somaxconn": 5},
    {"net.core.somaxconn": "1\0"}, {f"net.x{i}": "1" for i in range(65)}, ["net.core.somaxconn"],
])
def test_the_agent_refuses_sysctls_outside_the_pod_s_namespaces(given: Any) -> None:
    from micropod.agent.bundle import sysctls

    with pytest.raises(SecurityError):
        sysctls({"sysctls": given})


@pytest.mark.parametrize(("given", "problem"), [
    ({"vm.swappiness": "1"}, "invalid --sysctl vm.swappiness: not in a namespace"),
    ({"net..x": "1"}, "not a sysctl name"),
    ({"net.core.somaxconn": "x" * 5000}, "too long"),
])
def test_run_refuses_sysctls_that_are_not_namespaced(given: dict[str, str], problem: str) -> None:
    from micropod.service.admission import checked_sysctls

    assert checked_sysctls({"net.core.somaxconn": "128", "kernel.sem": "250 32000 32 128"}) == {
        "net.core.somaxconn": "128", "kernel.sem": "250 32000 32 128"}
    with pytest.raises(UsageError, match=problem):
        checked_sysctls(given)


def test_an_update_that_empties_a_cpuset_clears_it() -> None:
    """limits() leaves a cpuset it has no value for as it is (runc's update); the agent resets the ones an
    update gives empty to the parent's (V2Cgroup.clear_cpusets)."""
    from micropod.agent.bundle import cleared_cpusets

    assert cleared_cpusets({"cpuset_cpus": "", "cpuset_mems": "0"}) == ("cpus",)
    assert cleared_cpusets({"pids_limit": 3}) == ()
    assert cleared_cpusets({"cpuset_cpus": "", "cpuset_mems": ""}) == ("cpus", "mems")
