"""What ``micropod-runtime spec`` writes (runc 1.1's default config.json) and what ``features`` reports
(runtime-spec 1.2 features.md)."""

from __future__ import annotations

import copy
import os
from typing import Any

import micropod
from micropod.runtime.spec_linux import NAMESPACE_TYPES
from micropod.runtime.spec_mounts import MOUNT_OPTIONS

OCI_VERSION = "1.2.0"
OCI_VERSION_MIN = "1.0.0"
HOOK_NAMES = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")

_DEFAULT_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
_NODEV = ["nosuid", "noexec", "nodev"]


def _mount(destination: str, kind: str, source: str, options: list[str] | None = None) -> dict[str, Any]:
    mount: dict[str, Any] = {"destination": destination, "type": kind, "source": source}
    if options is not None:
        mount["options"] = options
    return mount


_DEFAULT: dict[str, Any] = {
    "ociVersion": OCI_VERSION,
    "process": {
        "terminal": True,
        "user": {"uid": 0, "gid": 0},
        "args": ["sh"],
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
        "cwd": "/",
        "capabilities": {name: list(_DEFAULT_CAPS) for name in ("bounding", "effective", "permitted", "ambient")},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
    },
    "root": {"path": "rootfs", "readonly": True},
    "hostname": "runc",
    "mounts": [
        _mount("/proc", "proc", "proc"),
        _mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        _mount("/dev/pts", "devpts", "devpts", ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                                                "gid=5"]),
        _mount("/dev/shm", "tmpfs", "shm", [*_NODEV, "mode=1777", "size=65536k"]),
        _mount("/dev/mqueue", "mqueue", "mqueue", list(_NODEV)),
        _mount("/sys", "sysfs", "sysfs", [*_NODEV, "ro"]),
        _mount("/sys/fs/cgroup", "cgroup", "cgroup", [*_NODEV, "relatime", "ro"]),
    ],
    "linux": {
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "namespaces": [{"type": name} for name in ("pid", "network", "ipc", "uts", "mount")],
        "maskedPaths": [
            "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
            "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
        ],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    },
}  # fmt: skip


def default_spec(rootless: bool = False) -> dict[str, Any]:
    """runc 1.1's ``runc spec`` (``--rootless``), but for ``ociVersion``, which is the version micropod-runtime
    implements; a fresh object each call."""
    spec = copy.deepcopy(_DEFAULT)
    if not rootless:
        return spec
    # As runc: no network namespace (an unprivileged user could not configure one), a user namespace mapping
    # root to the caller, /sys bound from the host (sysfs cannot be mounted), no gid=5 for devpts (unmapped).
    linux = spec["linux"]
    del linux["resources"]
    linux["uidMappings"] = [{"containerID": 0, "hostID": os.geteuid(), "size": 1}]
    linux["gidMappings"] = [{"containerID": 0, "hostID": os.getegid(), "size": 1}]
    linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] != "network"] + [{"type": "user"}]
    for mount in spec["mounts"]:
        if mount["destination"] == "/dev/pts":
            mount["options"].remove("gid=5")
        elif mount["destination"] == "/sys":
            mount.update(type="none", source="/sys", options=["rbind", *_NODEV, "ro"])
    return spec


def features() -> dict[str, Any]:
    """The runtime-spec features document: what micropod-runtime recognises, whatever this host offers. The
    capability and seccomp names come from the modules that act on them, so the document cannot drift."""
    from micropod.errors import SeccompError
    from micropod.runtime import caps, seccomp

    annotations = {"org.micropod.runtime.version": micropod.__version__}
    try:
        libseccomp = seccomp.version()
    except (OSError, SeccompError):
        supported: list[str] = []
    else:
        annotations["io.github.seccomp.libseccomp.version"] = ".".join(map(str, libseccomp))
        # The one flag that needs more than the libseccomp 2.5 of Debian bookworm.
        supported = [f for f in seccomp.FLAGS if libseccomp >= (2, 6) or f != "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"]
    return {
        "ociVersionMin": OCI_VERSION_MIN,
        "ociVersionMax": OCI_VERSION,
        "hooks": list(HOOK_NAMES),
        "mountOptions": sorted(MOUNT_OPTIONS),
        "linux": {
            "namespaces": sorted(NAMESPACE_TYPES),
            "capabilities": list(caps.ALL_CAPS),
            "cgroup": {"v1": True, "v2": True, "systemd": False, "systemdUser": False, "rdma": False},
            "seccomp": {
                "enabled": True,
                "actions": sorted(seccomp.ACTIONS),
                "operators": sorted(seccomp.OPERATORS),
                "archs": sorted(seccomp.ARCHITECTURES),
                "knownFlags": list(seccomp.FLAGS),
                "supportedFlags": supported,
            },
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
            "intelRdt": {"enabled": False},
            "mountExtensions": {"idmap": {"enabled": False}},
        },
        "annotations": annotations,
        "potentiallyUnsafeConfigAnnotations": [],
    }
