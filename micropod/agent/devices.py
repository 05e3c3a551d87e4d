"""Devices a container may be given (a CRI container's ``devices``, ``run --device``): the VM's own virtual ones.

A microVM has no host device to pass: the guest kernel's /dev is the VM's. So a request names a device of the
guest by its usual path, and only those that reach nothing of the host or of the agent may be given: FUSE and TUN
(the container's own filesystems and interfaces, inside the VM). A disk (the container's root and layers), the
console and the host channel's ports never are. The host refuses anything else before a VM is asked; the agent
checks again against the node it finds (a character device with the expected numbers), and the container gets
the node in its /dev and a devices-cgroup rule for the access asked for.
"""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# path in the guest -> (major, minor) of the character device the guest kernel makes there
PASSABLE = {"/dev/fuse": (10, 229), "/dev/net/tun": (10, 200)}
ACCESS = frozenset("rwm")
MAX_DEVICES = 16


class DeviceError(ValueError):
    """A device that cannot be given: its message names it."""


def check_request(path: str, container_path: str, permissions: str) -> str:
    """A request's problem, "" if it can be given: what the host checks before it asks a VM."""
    if path not in PASSABLE:
        return (f"device {path!r} cannot be passed into a microVM: only the VM's own "
                f"{', '.join(sorted(PASSABLE))} can")
    if (not container_path.startswith("/dev/") or "\0" in container_path
            or any(part in ("", ".", "..") for part in container_path[len("/dev/"):].split("/"))):
        # under /dev only: where mknod is refused, the runtime binds the guest's file at this path instead
        return f"device {path!r}: container path {container_path!r} is not a path under /dev"
    if not permissions or not set(permissions) <= ACCESS:
        return f"device {path!r}: permissions {permissions!r} are not a combination of r, w and m"
    return ""


def oci_devices(requested: object) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``linux.devices`` and the ``linux.resources.devices`` rules allowing them, for a spec's ``devices``."""
    if not requested:
        return [], []
    if not isinstance(requested, list) or len(requested) > MAX_DEVICES:
        raise DeviceError(f"devices: not a list of at most {MAX_DEVICES}")
    nodes: list[dict[str, Any]] = []
    rules: list[dict[str, Any]] = []
    for index, entry in enumerate(requested):
        fields = entry if isinstance(entry, dict) else {}
        path, target, access = (fields.get(k) for k in ("path", "container_path", "permissions"))
        if not (isinstance(path, str) and isinstance(target, str) and isinstance(access, str)):
            raise DeviceError(f"devices[{index}]: needs path, container_path and permissions strings")
        problem = check_request(path, target, access)
        if problem:
            raise DeviceError(problem)
        major, minor = PASSABLE[path]
        try:
            found = os.stat(path, follow_symlinks=False)
        except OSError as exc:
            raise DeviceError(f"device {path!r} is not in this VM: {exc.strerror}") from None
        if not stat.S_ISCHR(found.st_mode) or (os.major(found.st_rdev), os.minor(found.st_rdev)) != (major, minor):
            raise DeviceError(f"device {path!r} in this VM is not character device {major}:{minor}")
        nodes.append({"path": target, "type": "c", "major": major, "minor": minor, "fileMode": 0o666,
                      "uid": 0, "gid": 0})
        rules.append({"allow": True, "type": "c", "major": major, "minor": minor, "access": access})
    return nodes, rules
