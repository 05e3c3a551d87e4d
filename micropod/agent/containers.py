"""A container in the VM: its spec, its mounted root filesystem and its main process."""

from __future__ import annotations

import _socket

from micropod import wire
from micropod.agent import mounts

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from micropod.agent.process import Child


class Container:
    __slots__ = ("cid", "main", "main_done", "mounted", "prepared", "root", "spec")

    def __init__(self, cid: str, spec: dict[str, Any], root: str, mounted: list[str]) -> None:
        self.cid = cid
        self.spec = spec
        self.root = root
        self.mounted = mounted
        self.main: Proc | None = None
        self.main_done = False
        self.prepared = False  # a root-ready template's: mounted, waiting for the create of the run it resumes as


def valid_id(cid: str) -> bool:
    return 0 < len(cid) <= 128 and cid.isascii() and cid.replace("-", "").replace("_", "").replace(
        ".", "").isalnum() and not cid.startswith(".")


def mount_container(cid: str, spec: dict[str, Any], mount_base: str) -> Container:
    """Its root filesystem and hostname; a failure leaves nothing mounted."""
    root, plan = mounts.rootfs_plan(spec.get("rootfs") or {}, mounts.RootfsDirs(mount_base))
    mounted: list[str] = []
    try:
        mounts.apply(plan, mounted)
        # Volumes before /proc, /sys and /dev: an image's link must not lead a volume (or its first fill)
        # onto the agent's own view of the kernel.
        if spec.get("volumes") or spec.get("binds"):
            from micropod.agent.volumes import mount_binds, mount_volumes

            mount_volumes(cid, root, spec.get("volumes") or [], mounted)
            mount_binds(cid, root, spec.get("binds") or [], mounted)
        mounts.apply(mounts.container_plan(root), mounted)
        if spec.get("hostname"):
            _socket.sethostname(spec["hostname"])
    except BaseException:
        mounts.unmount_all(mounted)
        raise
    return Container(cid, spec, root, mounted)


def adopt(container: Container, spec: dict[str, Any]) -> bool:
    """A root-ready template's container taken over by the run resumed from it: the same root (base and layer
    devices), and nothing else to mount; its hostname set. False if it cannot be."""
    if not container.prepared or container.main is not None or spec.get("rootfs") != container.spec.get("rootfs"):
        return False
    if spec.get("volumes") or spec.get("binds"):
        return False
    if spec.get("hostname"):
        _socket.sethostname(spec["hostname"])
    container.spec = spec
    container.prepared = False
    return True


def exec_spec(base: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """docker exec: the container's env, user and working directory unless the exec overrides them."""
    return {
        **spec,
        "env": list(base.get("env") or []) + list(spec.get("env") or []),
        "user": spec.get("user") or base.get("user") or "",
        "cwd": spec.get("cwd") or base.get("cwd") or "/",
        "hostname": base.get("hostname") or "",
    }


class Proc:
    """A process the host started, from fork until its exit has been reported."""

    __slots__ = ("container", "is_main", "master", "outputs", "pid", "sid", "stdin", "stdin_eof",
                 "stdin_pending")

    def __init__(self, container: Container, sid: int, child: Child, is_main: bool) -> None:
        self.container = container
        self.sid = sid
        self.pid = child.pid
        self.is_main = is_main
        self.master = child.master
        self.stdin = child.stdin
        self.stdin_pending = bytearray()
        self.stdin_eof = False
        self.outputs = {child.stdout: wire.stream_id(sid, wire.STDOUT)}
        if child.stderr is not None:
            self.outputs[child.stderr] = wire.stream_id(sid, wire.STDERR)
