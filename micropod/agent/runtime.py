"""Every container process goes through micropod-runtime: the agent prepares what docker's engine would (the
user looked up in the image, /etc/hosts, the working directory, the environment), writes the bundle and calls
the runtime in-process (no second interpreter to start), so the container gets its own namespaces, cgroup,
capabilities and seccomp filter, and cannot see or signal the agent.

The runtime's forked children leave, so the container's init ends up a child of the agent (PID 1), which
reaps it and reports its exit as before.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from micropod.agent import bundle, users
from micropod.agent.launch import Launch, LaunchError, build_env, write_etc_file
from micropod.errors import OciRuntimeError
from micropod.runtime.execute import ExecOptions, spawn_exec
from micropod.runtime.lifecycle import CreateOptions, Lifecycle
from micropod.runtime.rootfs import beneath
from micropod.runtime.state import StateDir

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

STATE_ROOT = Path("/run/micropod-runtime")


def _life() -> Lifecycle:
    return Lifecycle(StateDir(STATE_ROOT))


def _inside(root: str, path: str) -> Path | None:
    """A path of the image: its directory's links resolved inside the root, its last component left as it is
    (the readers and writers open it without following a link), and the directory on the image's own
    filesystem, not on the agent's /proc, /sys or /dev mounted beneath the root."""
    directory = beneath(Path(root), os.path.dirname(path) or "/")
    with contextlib.suppress(OSError):
        if os.stat(directory).st_dev != os.stat(root).st_dev:
            return None
    return directory / os.path.basename(path)


def _image_file(root: str, path: str) -> str:
    """Where to read one of the image's files; a path that does not exist if it is not the image's."""
    found = _inside(root, path)
    return str(found) if found is not None else "/nonexistent/refused"


def _process(launch: Launch) -> dict[str, Any]:
    """docker's process for the launch: user and groups from the image's files, env, cwd, terminal."""
    try:
        user = users.resolve(launch.user, passwd=_image_file(launch.root, "/etc/passwd"),
                             group=_image_file(launch.root, "/etc/group"))
    except users.UserError as exc:
        raise LaunchError(launch.user_error_code, str(exc)) from exc
    for path, text in launch.etc_files.items():
        target = _inside(launch.root, path)
        if target is not None:  # an /etc that leads onto the agent's mounts gets none of these
            write_etc_file(str(target), text)
    if launch.make_cwd:
        try:
            os.makedirs(beneath(Path(launch.root), launch.cwd), mode=0o755, exist_ok=True)
        except OSError as exc:
            raise LaunchError(126, f"cannot create working directory {launch.cwd}: {exc.strerror}") from exc
    env = build_env(launch, user.home)
    process: dict[str, Any] = {
        "args": list(launch.args), "env": [f"{k}={v}" for k, v in env.items()], "cwd": launch.cwd,
        "user": {"uid": user.uid, "gid": user.gid, "additionalGids": list(user.groups), "umask": 0o022},
        "terminal": launch.tty,
    }
    return process


def start_main(cid: str, launch: Launch, spec: dict[str, Any], stdio: tuple[int, int, int]) -> int:
    """Create and start the container; its init's pid. LaunchError with docker's code if it cannot run."""
    process = _process(launch)
    try:
        document = bundle.config(cid, launch.root, process, spec)
        bundle.write_network_sysctls(bundle.sysctls(spec)[1])
    except bundle.SecurityError as exc:
        raise LaunchError(125, str(exc)) from exc
    directory = bundle.write(cid, document)
    life = _life()
    forget(cid)  # a restarted container's leftovers
    try:
        options = CreateOptions(bundle=Path(directory), stdio=stdio, trusted_config=document,
                                seccomp_filter=bundle.seccomp_filter(document))
        container = life.create(cid, options)
        life.start(cid)
    except OciRuntimeError as exc:
        forget(cid)
        raise LaunchError(exc.launch_code, exc.message) from exc
    return container.pid


def start_exec(cid: str, launch: Launch, stdio: tuple[int, int, int]) -> int:
    """Another process in the running container; its pid."""
    process = _process(launch)
    try:
        base = _container_process(cid)
        process["capabilities"] = base.get("capabilities")
        process["noNewPrivileges"] = bool(base.get("noNewPrivileges"))
        _, pid = spawn_exec(_life(), cid, ExecOptions(detach=True, stdio=stdio), process=process)
    except OciRuntimeError as exc:
        raise LaunchError(exc.launch_code, exc.message) from exc
    return pid


def _container_process(cid: str) -> dict[str, Any]:
    """The main process's capabilities and no_new_privs are every exec's, as with docker exec."""
    with open(f"{bundle.BUNDLE_BASE}/{cid}/config.json", "rb") as f:
        document = json.load(f)
    return dict(document.get("process") or {})


def update(cid: str, resources: dict[str, Any], cleared_cpusets: tuple[str, ...] = ()) -> None:
    """New limits for a running container's cgroup, as `micropod-runtime update` sets them; ``cleared_cpusets``
    (cpus, mems) go back to the parent's (the guest's cgroups are v2)."""
    from micropod.runtime import cgroups
    from micropod.runtime.cgroups_v2 import V2Cgroup

    group = cgroups.cgroup_from_paths(_life().states.load(cid).cgroup_paths)
    group.validate(resources)
    group.apply(resources)
    if cleared_cpusets and isinstance(group, V2Cgroup):
        group.clear_cpusets(cleared_cpusets)


def forget(cid: str) -> None:
    """The runtime's record and cgroup of an ended container (its processes killed first)."""
    with contextlib.suppress(OciRuntimeError, OSError):
        _life().delete(cid, force=True)


def warm_up() -> None:
    """What a container start needs, loaded at boot: a VM resumed from its boot snapshot has it all already
    (imports and libseccomp cost seconds under emulation, every time, if left to the first container)."""
    from micropod.runtime import cgroups_devices, cgroups_spec, cgroups_v1, cgroups_v2, init, seccomp

    del cgroups_devices, cgroups_spec, cgroups_v1, init
    seccomp.preload()
    bundle.warm_up()
    cgroups_v2.warm_up(bundle.CGROUP_PARENT)
