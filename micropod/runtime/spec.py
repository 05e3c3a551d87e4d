"""A bundle's config.json (OCI runtime-spec 1.2), loaded and checked before anything acts on it.

config.json is untrusted input: its size is capped, every field the runtime uses is checked for type and
range, and the first bad one raises ``SpecError(field, problem)`` with the field's path
(``linux.namespaces[2].type``). Unknown fields are ignored, as the spec requires. Where runc is more lenient
than the spec in a way that callers rely on (relative mount destinations), the bundle loads with a line in
``Bundle.warnings`` instead. The ``linux`` section and the shared tables live in ``spec_linux``;
``default_spec`` and ``features`` in ``spec_defaults``.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from micropod.errors import SpecError
from micropod.runtime.spec_defaults import HOOK_NAMES, OCI_VERSION, default_spec, features
from micropod.runtime.spec_linux import (
    RLIMITS,
    U32,
    U64,
    Linux,
    parse_linux,
    want_abs,
    want_bool,
    want_env,
    want_int,
    want_list,
    want_obj,
    want_str,
    want_str_list,
    want_str_map,
)
from micropod.runtime.spec_mounts import MS_BIND, MountOptions, parse_mount_options
from micropod.runtime.state import validate_id

__all__ = [
    "MAX_CONFIG_BYTES", "OCI_VERSION", "Bundle", "Capabilities", "Hook", "Hooks", "Mount", "Process", "Rlimit", "User",
    "default_spec", "features", "load_bundle", "parse_process", "read_config", "validate_id",
]  # fmt: skip

MAX_CONFIG_BYTES = 4 * 1024 * 1024
CAPABILITY_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")
HOST_NAME_MAX = 64
NGROUPS_MAX = 65536
_SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?", re.ASCII)
# runc's ^[\w+-\.]+$: in Go, "+-\." is the range from '+' to '.', so ',' is allowed too.


@dataclass(frozen=True)
class User:
    uid: int = 0
    gid: int = 0
    umask: int | None = None  # None: leave the runtime's umask
    additional_gids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Rlimit:
    type: str
    resource: int  # the RLIMIT_* number for setrlimit/prlimit
    soft: int
    hard: int


@dataclass(frozen=True)
class Capabilities:
    bounding: tuple[str, ...] = ()
    effective: tuple[str, ...] = ()
    inheritable: tuple[str, ...] = ()
    permitted: tuple[str, ...] = ()
    ambient: tuple[str, ...] = ()


@dataclass(frozen=True)
class Process:
    args: tuple[str, ...]
    cwd: str  # absolute, inside the container
    env: tuple[str, ...] = ()
    terminal: bool = False
    console_size: tuple[int, int] | None = None  # (height, width)
    user: User = field(default_factory=User)
    rlimits: tuple[Rlimit, ...] = ()
    capabilities: Capabilities = field(default_factory=Capabilities)  # absent: none at all, as in runc
    no_new_privileges: bool = False
    oom_score_adj: int | None = None  # None: leave it


@dataclass(frozen=True)
class Mount:
    destination: str  # absolute and normalised, inside the container
    type: str
    source: str  # for a bind mount, a host path made absolute against the bundle
    options: tuple[str, ...]
    parsed: MountOptions

    @property
    def is_bind(self) -> bool:
        return bool(self.parsed.flags & MS_BIND)


@dataclass(frozen=True)
class Hook:
    path: Path
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout: int | None = None  # seconds


@dataclass(frozen=True)
class Hooks:
    prestart: tuple[Hook, ...] = ()
    # The spec's names, so that hooks.get(name) is getattr.
    createRuntime: tuple[Hook, ...] = ()
    createContainer: tuple[Hook, ...] = ()
    startContainer: tuple[Hook, ...] = ()
    poststart: tuple[Hook, ...] = ()
    poststop: tuple[Hook, ...] = ()

    def get(self, name: str) -> tuple[Hook, ...]:
        if name not in HOOK_NAMES:
            raise KeyError(name)
        hooks: tuple[Hook, ...] = getattr(self, name)
        return hooks


@dataclass(frozen=True)
class Bundle:
    path: Path  # absolute, symlinks resolved
    config: dict[str, Any]  # the JSON as read
    oci_version: str
    rootfs: Path
    root_readonly: bool
    process: Process
    hostname: str | None = None
    domainname: str | None = None
    mounts: tuple[Mount, ...] = ()
    hooks: Hooks = field(default_factory=Hooks)
    annotations: dict[str, str] = field(default_factory=dict)
    linux: Linux = field(default_factory=Linux)
    warnings: tuple[str, ...] = ()  # for the log, one line each


def load_bundle(bundle: Path | str) -> Bundle:
    """Read ``bundle/config.json`` and check it; nothing is created or changed."""
    given = Path(bundle)
    if not given.exists():
        raise SpecError("bundle", f"{given} does not exist")
    if not given.is_dir():
        raise SpecError("bundle", f"{given} is not a directory")
    path = given.resolve(strict=True)
    config = read_config(path / "config.json")
    warnings: list[str] = []
    version = want_str(config.get("ociVersion"), "ociVersion")
    match = _SEMVER.fullmatch(version)
    if match is None or match.group(1) != "1":
        raise SpecError("ociVersion", f"must be a 1.x version (SemVer), got {version!r}")
    root = want_obj(config.get("root"), "root")
    rootfs = _rootfs(path, root.get("path"))
    readonly = root.get("readonly")
    process = parse_process(config.get("process"), warnings)
    linux = parse_linux(config.get("linux"), warnings)
    return Bundle(
        path=path,
        config=config,
        oci_version=version,
        rootfs=rootfs,
        root_readonly=False if readonly is None else want_bool(readonly, "root.readonly"),
        process=process,
        hostname=_uts_name(config.get("hostname"), "hostname", linux),
        domainname=_uts_name(config.get("domainname"), "domainname", linux),
        mounts=_mounts(config.get("mounts"), path, warnings),
        hooks=_hooks(config.get("hooks")),
        annotations={} if config.get("annotations") is None else want_str_map(config["annotations"], "annotations"),
        linux=linux,
        warnings=tuple(warnings),
    )


def read_config(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``: a regular file of at most MAX_CONFIG_BYTES."""
    try:
        # O_NONBLOCK: a FIFO planted as config.json must not hang the runtime in open().
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise SpecError(path.name, f"not found in {path.parent}") from None
    except OSError as exc:
        raise SpecError(path.name, f"cannot be opened: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SpecError(path.name, "is not a regular file")
        raw = file.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise SpecError(path.name, f"is larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB")

    def no_constant(name: str) -> object:
        raise SpecError(path.name, f"is not valid JSON: {name} is not a JSON number")

    try:
        config = json.loads(raw.decode(), parse_constant=no_constant)
    except UnicodeDecodeError as exc:
        raise SpecError(path.name, f"is not UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise SpecError(path.name, f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise SpecError(path.name, "is not valid JSON: nested too deeply") from None
    if not isinstance(config, dict):
        raise SpecError(path.name, "must hold a JSON object")
    return config


def _rootfs(bundle: Path, value: object) -> Path:
    given = want_str(value, "root.path")
    if not given:
        raise SpecError("root.path", "is required")
    rootfs = _clean(os.path.join(bundle, given))
    try:
        mode = os.stat(rootfs).st_mode
    except FileNotFoundError:
        raise SpecError("root.path", f"{rootfs} does not exist") from None
    except OSError as exc:
        raise SpecError("root.path", f"{rootfs}: {exc.strerror}") from exc
    if not stat.S_ISDIR(mode):
        raise SpecError("root.path", f"{rootfs} is not a directory")
    real = os.path.realpath(rootfs)
    if real != rootfs:
        # As runc ("invalid rootfs: not an absolute path, or a symlink"): the rootfs is named by its real path.
        raise SpecError("root.path", f"{rootfs} goes through a symlink (it is {real}); give the real path")
    return Path(rootfs)


def _clean(path: str) -> str:
    """Lexically normalised and absolute; POSIX's special leading "//" collapsed too."""
    return os.path.normpath("/" + path.lstrip("/"))


def parse_process(value: object, warnings: list[str], where: str = "process") -> Process:
    """The ``process`` object; also what ``exec --process`` reads."""
    process = want_obj(value, where)
    args = process.get("args")
    if not isinstance(args, list) or not args:
        raise SpecError(f"{where}.args", "must be a non-empty list of strings")
    cwd = want_abs(process.get("cwd"), f"{where}.cwd")
    for key in ("scheduler", "ioPriority", "execCPUAffinity"):
        if process.get(key) is not None:
            raise SpecError(f"{where}.{key}", "is not supported by micropod-runtime")
    for key in ("apparmorProfile", "selinuxLabel"):
        if process.get(key) is not None and want_str(process[key], f"{where}.{key}"):
            warnings.append(f"{where}.{key} is ignored: micropod-runtime has no LSM support")
    caps = process.get("capabilities")
    oom = process.get("oomScoreAdj")
    return Process(
        args=want_str_list(args, f"{where}.args"),
        cwd=_clean(cwd),
        env=() if process.get("env") is None else want_env(process["env"], f"{where}.env"),
        terminal=_flag(process, "terminal", where),
        console_size=_console_size(process.get("consoleSize"), f"{where}.consoleSize"),
        user=_user(process.get("user"), f"{where}.user"),
        rlimits=_rlimits(process.get("rlimits"), f"{where}.rlimits"),
        capabilities=Capabilities() if caps is None else _capabilities(caps, f"{where}.capabilities"),
        no_new_privileges=_flag(process, "noNewPrivileges", where),
        oom_score_adj=None if oom is None else want_int(oom, f"{where}.oomScoreAdj", -1000, 1000),
    )


def _flag(obj: dict[str, Any], key: str, where: str) -> bool:
    return False if obj.get(key) is None else want_bool(obj[key], f"{where}.{key}")


def _console_size(value: object, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    size = want_obj(value, where)
    return want_int(size.get("height"), f"{where}.height", 0, 0xFFFF), want_int(
        size.get("width"), f"{where}.width", 0, 0xFFFF
    )


def _user(value: object, where: str) -> User:
    if value is None:
        return User()
    user = want_obj(value, where)
    # uid and gid are optional in the schema; runc (Go's zero values) takes a missing one as 0.
    uid, gid, umask = (user.get(k) for k in ("uid", "gid", "umask"))
    gids = [] if user.get("additionalGids") is None else want_list(user["additionalGids"], f"{where}.additionalGids")
    if len(gids) > NGROUPS_MAX:
        raise SpecError(f"{where}.additionalGids", f"has more than {NGROUPS_MAX} groups")
    return User(
        uid=0 if uid is None else want_int(uid, f"{where}.uid"),
        gid=0 if gid is None else want_int(gid, f"{where}.gid"),
        umask=None if umask is None else want_int(umask, f"{where}.umask", 0, 0o777),
        additional_gids=tuple(want_int(g, f"{where}.additionalGids[{i}]") for i, g in enumerate(gids)),
    )


def _rlimits(value: object, field: str) -> tuple[Rlimit, ...]:
    if value is None:
        return ()
    seen: dict[str, int] = {}
    rlimits = []
    for i, item in enumerate(want_list(value, field)):
        where = f"{field}[{i}]"
        entry = want_obj(item, where)
        kind = want_str(entry.get("type"), f"{where}.type")
        if kind not in RLIMITS:
            raise SpecError(f"{where}.type", f"unknown rlimit type {kind!r} (RLIMIT_NOFILE, RLIMIT_NPROC, ...)")
        if kind in seen:
            raise SpecError(f"{where}.type", f"duplicate rlimit type {kind!r} (also {field}[{seen[kind]}])")
        seen[kind] = i
        soft = want_int(entry.get("soft"), f"{where}.soft", 0, U64)
        hard = want_int(entry.get("hard"), f"{where}.hard", 0, U64)
        if soft > hard:
            raise SpecError(f"{where}.soft", f"{soft} is above the hard limit {hard}")
        rlimits.append(Rlimit(kind, RLIMITS[kind], soft, hard))
    return tuple(rlimits)


def _capabilities(value: object, where: str) -> Capabilities:
    # Only the shape: names are micropod.runtime.caps' to check (unknown ones are a warning, per the spec).
    caps = want_obj(value, where)
    given = [name for name in CAPABILITY_SETS if caps.get(name) is not None]
    return Capabilities(**{name: want_str_list(caps[name], f"{where}.{name}") for name in given})


def _uts_name(value: object, key: str, linux: Linux) -> str | None:
    if value is None or value == "":
        return None
    name = want_str(value, key)
    if len(name.encode()) > HOST_NAME_MAX:
        raise SpecError(key, f"is longer than {HOST_NAME_MAX} bytes")
    if linux.namespace("uts") is None:
        raise SpecError(key, "needs a uts namespace in linux.namespaces (it would change the host's)")
    return name


def _mounts(value: object, bundle: Path, warnings: list[str]) -> tuple[Mount, ...]:
    if value is None:
        return ()
    mounts = []
    for i, item in enumerate(want_list(value, "mounts")):
        where = f"mounts[{i}]"
        entry = want_obj(item, where)
        destination = want_str(entry.get("destination"), f"{where}.destination")
        if not destination:
            raise SpecError(f"{where}.destination", "is required")
        if not destination.startswith("/"):
            # runc 1.1 warns and mounts it relative to "/"; runtime-spec 1.2 allows it (deprecated).
            warnings.append(f"{where}.destination {destination!r} is not absolute: taken as relative to /")
        kind = "" if entry.get("type") is None else want_str(entry["type"], f"{where}.type")
        source = "" if entry.get("source") is None else want_str(entry["source"], f"{where}.source")
        options = () if entry.get("options") is None else want_str_list(entry["options"], f"{where}.options")
        parsed = parse_mount_options(options, f"{where}.options")
        for key in ("uidMappings", "gidMappings"):
            if entry.get(key) is not None:
                raise SpecError(f"{where}.{key}", "id-mapped mounts are not supported by micropod-runtime")
        if parsed.flags & MS_BIND:
            if not source:
                raise SpecError(f"{where}.source", "a bind mount needs a source")
            kind, source = "bind", os.path.join(bundle, source)
        mounts.append(Mount(_clean(destination), kind, source, options, parsed))
    return tuple(mounts)


def _hooks(value: object) -> Hooks:
    if value is None:
        return Hooks()
    hooks = want_obj(value, "hooks")
    found = {}
    for name in HOOK_NAMES:
        if hooks.get(name) is not None:
            items = want_list(hooks[name], f"hooks.{name}")
            found[name] = tuple(_hook(item, f"hooks.{name}[{i}]") for i, item in enumerate(items))
    return Hooks(**found)


def _hook(value: object, where: str) -> Hook:
    hook = want_obj(value, where)
    timeout = hook.get("timeout")
    return Hook(
        path=Path(want_abs(hook.get("path"), f"{where}.path")),
        args=() if hook.get("args") is None else want_str_list(hook["args"], f"{where}.args"),
        env=() if hook.get("env") is None else want_env(hook["env"], f"{where}.env"),
        timeout=None if timeout is None else want_int(timeout, f"{where}.timeout", 1, U32),
    )
