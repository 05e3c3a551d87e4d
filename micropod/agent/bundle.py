"""The OCI bundle the agent generates for each container, run through micropod-runtime (micropod/runtime).

What docker's default spec gives a container, inside our VM: its own pid, ipc, uts, mount and cgroup
namespaces (the network is the VM's, which is the container's or its pod's), docker's default capabilities and
seccomp profile, masked and read-only /proc paths, a cgroup of its own under /micropod. The agent has already
mounted the root with its /dev (the devices docker gives, no device of the host channel), /dev/pts, /dev/shm
and a read-only /sys; the runtime's recursive bind of the root carries them into the container's namespace,
and it mounts the container's own /proc, /dev/mqueue and /sys/fs/cgroup on top.

``--privileged`` lifts the capability, seccomp and path restrictions, as docker's does. The VM stays the
boundary that protects the host; inside it, a privileged container can take over the agent.
"""

from __future__ import annotations

import functools
import json
import os

from micropod.agent import devices
from micropod.runtime import caps, seccomp, seccomp_docker
from micropod.runtime.spec_linux import SYSCTL_NAME, sysctl_namespace
from micropod.wire import CPU_PERIOD

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

BUNDLE_BASE = "/run/micropod/bundles"
CGROUP_PARENT = "/micropod"

MASKED_PATHS = ("/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                "/sys/devices/virtual/powercap")
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


class SecurityError(ValueError):
    """A bad --cap-add, --cap-drop or --security-opt: docker's 125."""


def capability_set(spec: dict[str, Any]) -> list[str]:
    """docker's rule: the default set, then --cap-add (ALL for every one), then --cap-drop (ALL for none)."""
    if spec.get("privileged"):
        return list(caps.available())
    chosen = list(caps.DOCKER_DEFAULT_CAPS)
    for raw in spec.get("cap_add") or []:
        name = _cap_name(str(raw))
        if name == "CAP_ALL":
            chosen = list(caps.available())
        elif name not in chosen:
            chosen.append(name)
    for raw in spec.get("cap_drop") or []:
        name = _cap_name(str(raw))
        chosen = [] if name == "CAP_ALL" else [c for c in chosen if c != name]
    return chosen


def _cap_name(raw: str) -> str:
    name = raw.upper()
    name = name if name.startswith("CAP_") else f"CAP_{name}"
    if name != "CAP_ALL" and caps.number(name) is None:
        raise SecurityError(f"unknown capability: {raw!r}")
    return name


def seccomp_profile(spec: dict[str, Any], capabilities: list[str]) -> dict[str, Any] | None:
    if spec.get("privileged"):
        return None
    chosen = spec.get("seccomp") or "default"
    if chosen == "unconfined":
        return None
    if chosen == "default":
        return _docker_default(tuple(sorted(capabilities)))
    try:
        profile = json.loads(chosen)
    except ValueError as exc:
        raise SecurityError(f"--security-opt seccomp: not a JSON profile: {exc}") from None
    if not isinstance(profile, dict):
        raise SecurityError("--security-opt seccomp: the profile must be a JSON object")
    return seccomp_docker.from_docker_profile(profile, capabilities) if "defaultAction" in profile else profile


# id -> (profile, its filter); the entry keeps the profile alive, so that its id is never another's.
_parsed_defaults: dict[int, tuple[dict[str, Any], seccomp.Filter | None]] = {}


@functools.lru_cache(maxsize=8)
def _docker_default(capabilities: tuple[str, ...]) -> dict[str, Any]:
    profile = seccomp_docker.docker_default(capabilities)
    _parsed_defaults[id(profile)] = (profile, seccomp.parse(profile))
    return profile


def seccomp_filter(document: dict[str, Any]) -> seccomp.Filter | None:
    """The document's seccomp profile parsed, for the runtime: docker's default for a capability set is
    parsed once, when it is made (tens of milliseconds under emulation, per container otherwise)."""
    profile = (document.get("linux") or {}).get("seccomp")
    found = _parsed_defaults.get(id(profile))
    if found is not None and found[0] is profile:
        return found[1]
    return seccomp.parse(profile)


def warm_up() -> None:
    """docker's profile for the default capabilities, made, parsed and compiled once at boot (so, in a boot
    snapshot, never again)."""
    seccomp.precompile(_docker_default(tuple(sorted(caps.DOCKER_DEFAULT_CAPS))))


def _resources(spec: dict[str, Any]) -> dict[str, Any]:
    """--pids-limit, and a pod's container's --memory, --cpus, cpu shares and cpuset, as its cgroup's limits."""
    return limits(spec, updating=False)


_COUNTS = ("pids_limit", "memory_limit", "cpu_shares")
_CPUSETS = ("cpuset_cpus", "cpuset_mems")


def limits(spec: dict[str, Any], updating: bool) -> dict[str, Any]:
    """The OCI resources of a spec's limits. At creation 0 (or "") is none; on an update only the keys given
    change, and 0 lifts a count's or the CPU quota's limit (cpu shares and cpusets are kept unless given)."""
    for name in _COUNTS:
        value = spec.get(name) or 0
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 62:
            raise SecurityError(f"{name}: {value!r} is not a count")
    for name in _CPUSETS:
        value = spec.get(name) or ""
        if not isinstance(value, str) or len(value) > 256:
            raise SecurityError(f"{name}: {value!r} is not a list of CPUs or nodes")
    cpus = spec.get("cpu_quota") or 0
    if isinstance(cpus, bool) or not isinstance(cpus, int | float) or not 0 <= cpus <= 1024:
        raise SecurityError(f"cpu_quota: {cpus!r} is not a number of CPUs")
    unlimited = -1 if updating else 0

    def given(name: str) -> bool:
        return name in spec if updating else bool(spec.get(name))

    resources: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    if given("pids_limit"):
        resources["pids"] = {"limit": spec["pids_limit"] or unlimited}
    if given("memory_limit"):
        resources["memory"] = {"limit": spec["memory_limit"] or unlimited}
    if given("cpu_quota"):
        cpu.update(quota=max(1000, int(cpus * CPU_PERIOD)) if cpus else unlimited, period=CPU_PERIOD)
    if spec.get("cpu_shares"):
        cpu["shares"] = spec["cpu_shares"]
    for name, key in zip(_CPUSETS, ("cpus", "mems"), strict=True):
        if spec.get(name):
            cpu[key] = spec[name]
    if cpu:
        resources["cpu"] = cpu
    return resources


def cleared_cpusets(spec: dict[str, Any]) -> tuple[str, ...]:
    """An update's cpusets given empty: ``cpus``, ``mems``, to be reset to the parent's (limits() leaves a cpuset
    it is not given a value for as it is, as runc's update does)."""
    return tuple(key for name, key in zip(_CPUSETS, ("cpus", "mems"), strict=True)
                 if name in spec and spec[name] == "")


MAX_SYSCTLS = 64
MAX_SYSCTL_VALUE = 4096


def sysctls(spec: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """A pod's sysctls, split: those of the container's own IPC and UTS namespaces (its OCI config's), and the
    network's, which every container of the pod shares with the agent (so the agent writes them)."""
    raw = spec.get("sysctls") or {}
    if not isinstance(raw, dict) or len(raw) > MAX_SYSCTLS:
        raise SecurityError(f"sysctls: not a map of at most {MAX_SYSCTLS} names to values")
    own: dict[str, str] = {}
    network: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not SYSCTL_NAME.fullmatch(key):
            raise SecurityError(f"sysctl {key!r}: not a sysctl name")
        if not isinstance(value, str) or len(value) > MAX_SYSCTL_VALUE or "\0" in value:
            raise SecurityError(f"sysctl {key}: its value is not a string of at most {MAX_SYSCTL_VALUE} characters")
        kind = sysctl_namespace(key)
        if kind is None or key == "kernel.hostname":
            raise SecurityError(f"sysctl {key} is not in a namespace of the pod")
        (network if kind == "network" else own)[key] = value
    return own, network


def write_network_sysctls(values: dict[str, str]) -> None:
    """The pod's network sysctls, in the agent's (the pod's) network namespace."""
    for key, value in values.items():
        path = "/proc/sys/" + (key if "/" in key else key.replace(".", "/"))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise SecurityError(f"sysctl {key}={value}: {exc.strerror}") from None


# docker's options for --tmpfs before the user's own, which come later and so win.
TMPFS_DEFAULTS = ("rw", "noexec", "nosuid", "nodev")


def tmpfs_mounts(requested: list[Any]) -> list[dict[str, Any]]:
    mounts = []
    for index, entry in enumerate(requested):
        target = entry.get("target") if isinstance(entry, dict) else None
        options = entry.get("options") if isinstance(entry, dict) else None
        if not isinstance(target, str) or not target.startswith("/"):
            raise SecurityError(f"tmpfs[{index}].target: {target!r} is not an absolute path")
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise SecurityError(f"tmpfs[{index}].options: not a list of strings")
        mounts.append({"destination": target, "type": "tmpfs", "source": "tmpfs",
                       "options": [*TMPFS_DEFAULTS, *options]})
    return mounts


def config(cid: str, root: str, process: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """config.json for the container ``cid`` rooted at ``root``; ``process`` is resolved by the agent."""
    privileged = bool(spec.get("privileged"))
    capabilities = capability_set(spec)
    sets = {name: list(capabilities) for name in ("bounding", "effective", "permitted")}
    linux: dict[str, Any] = {
        "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")],
        "cgroupsPath": f"{CGROUP_PARENT}/{cid}",
        "resources": _resources(spec),
    }
    try:
        nodes, rules = devices.oci_devices(spec.get("devices"))
    except devices.DeviceError as exc:
        raise SecurityError(str(exc)) from None
    if nodes:
        linux["devices"] = nodes
        linux["resources"]["devices"] = rules
    own_sysctls = sysctls(spec)[0]
    if own_sysctls:
        linux["sysctl"] = own_sysctls
    if not privileged:
        linux["maskedPaths"] = list(MASKED_PATHS)
        linux["readonlyPaths"] = list(READONLY_PATHS)
    profile = seccomp_profile(spec, capabilities)
    if profile is not None:
        linux["seccomp"] = profile
    cgroup_options = ["nosuid", "noexec", "nodev", "relatime"] + ([] if privileged else ["ro"])
    return {
        "ociVersion": "1.2.0",
        "root": {"path": root, "readonly": bool(spec.get("read_only"))},
        "hostname": spec.get("hostname") or "",
        "process": {**process, "capabilities": sets,
                    "noNewPrivileges": bool(spec.get("no_new_privileges"))},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": cgroup_options},
            *tmpfs_mounts(spec.get("tmpfs") or []),
        ],
        "linux": linux,
    }


def write(cid: str, document: dict[str, Any]) -> str:
    """The bundle directory, its config.json written afresh (private: the env may hold secrets)."""
    directory = f"{BUNDLE_BASE}/{cid}"
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = f"{directory}/config.json"
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        # dumps, not dump: only dumps uses the C encoder, several times faster on a seccomp profile.
        f.write(json.dumps(document).encode())
    os.replace(path + ".tmp", path)
    return directory
