"""micropod.runtime.spec: config.json loaded into dataclasses, every validation error naming its field, container
ids, mount options, and ``spec``/``features`` compared with Debian's runc where it is installed."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from micropod.errors import OciRuntimeError, SpecError
from micropod.runtime import spec_mounts as m
from micropod.runtime.spec import (
    MAX_CONFIG_BYTES,
    Capabilities,
    Hook,
    Mount,
    Rlimit,
    User,
    default_spec,
    features,
    load_bundle,
    validate_id,
)
from micropod.runtime.spec_linux import Device, IdMapping, Namespace, TimeOffset

RUNC = shutil.which("runc")
needs_runc = pytest.mark.skipif(RUNC is None, reason="runc is not installed (apt-get install runc)")

Config = dict[str, Any]


def base() -> Config:
    config = default_spec()
    config["process"]["terminal"] = False
    return config


def make_bundle(tmp_path: Path, config: Config | str | bytes | None = None) -> Path:
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True, exist_ok=True)
    config = base() if config is None else config
    raw = config if isinstance(config, str | bytes) else json.dumps(config)
    (bundle / "config.json").write_bytes(raw.encode() if isinstance(raw, str) else raw)
    return bundle


def spec_error(tmp_path: Path, config: Config | str | bytes) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_bundle(make_bundle(tmp_path, config))
    return info.value


# --- mutations of the base config, for the table of errors ---


def at(config: Config, path: str) -> tuple[Any, str]:
    *parents, last = path.split(".")
    node: Any = config
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    return node, last


def put(path: str, value: Any) -> Callable[[Config], None]:
    def mutate(config: Config) -> None:
        node, key = at(config, path)
        node[key] = copy.deepcopy(value)  # the table's values are shared by every case

    return mutate


def drop(path: str) -> Callable[[Config], None]:
    def mutate(config: Config) -> None:
        node, key = at(config, path)
        del node[key]

    return mutate


def add(path: str, *values: Any) -> Callable[[Config], None]:
    def mutate(config: Config) -> None:
        node, key = at(config, path)
        node.setdefault(key, []).extend(copy.deepcopy(values))

    return mutate


def without_ns(kind: str) -> Callable[[Config], None]:
    def mutate(config: Config) -> None:
        config["linux"]["namespaces"] = [ns for ns in config["linux"]["namespaces"] if ns["type"] != kind]

    return mutate


def both(*mutations: Callable[[Config], None]) -> Callable[[Config], None]:
    def mutate(config: Config) -> None:
        for mutation in mutations:
            mutation(config)

    return mutate


USERNS = both(add("linux.namespaces", {"type": "user"}),
              put("linux.uidMappings", [{"containerID": 0, "hostID": 100000, "size": 65536}]),
              put("linux.gidMappings", [{"containerID": 0, "hostID": 100000, "size": 65536}]))  # fmt: skip
MAPPING = {"containerID": 0, "hostID": 1000, "size": 1}
BIND = {"destination": "/mnt", "type": "bind", "source": "/tmp", "options": ["rbind"]}

# (mutation, the field the error names, a fragment of the problem)
ERRORS: dict[str, tuple[Callable[[Config], None], str, str]] = {
    "no ociVersion": (drop("ociVersion"), "ociVersion", "is required"),
    "ociVersion 2.x": (put("ociVersion", "2.0.0"), "ociVersion", "must be a 1.x version"),
    "ociVersion not semver": (put("ociVersion", "1.0"), "ociVersion", "must be a 1.x version"),
    "ociVersion a number": (put("ociVersion", 1), "ociVersion", "must be a string"),
    "no root": (drop("root"), "root", "is required"),
    "no root.path": (drop("root.path"), "root.path", "is required"),
    "empty root.path": (put("root.path", ""), "root.path", "is required"),
    "root.path missing": (put("root.path", "nope"), "root.path", "does not exist"),
    "root.path a file": (put("root.path", "config.json"), "root.path", "is not a directory"),
    "root.readonly not bool": (put("root.readonly", "yes"), "root.readonly", "must be true or false"),
    "no process": (drop("process"), "process", "is required"),
    "empty args": (put("process.args", []), "process.args", "must be a non-empty list of strings"),
    "no args": (drop("process.args"), "process.args", "must be a non-empty list of strings"),
    "args a string": (put("process.args", "sh"), "process.args", "must be a non-empty list of strings"),
    "args not strings": (put("process.args", ["sh", 1]), "process.args[1]", "must be a string"),
    "args with NUL": (put("process.args", ["s\0h"]), "process.args[0]", "NUL"),
    "no cwd": (drop("process.cwd"), "process.cwd", "is required"),
    "relative cwd": (put("process.cwd", "tmp"), "process.cwd", "must be an absolute path"),
    "env without =": (put("process.env", ["PATH=/bin", "NOEQUALS"]), "process.env[1]", "KEY=VALUE"),
    "env without key": (put("process.env", ["=x"]), "process.env[0]", "KEY=VALUE"),
    "env not strings": (put("process.env", [5]), "process.env[0]", "must be a string"),
    "env lone surrogate": (put("process.env", ["A=\ud800"]), "process.env[0]", "UTF-8"),
    "terminal not bool": (put("process.terminal", 1), "process.terminal", "must be true or false"),
    "uid negative": (put("process.user.uid", -1), "process.user.uid", "between 0 and 4294967295"),
    "uid too big": (put("process.user.uid", 2**32), "process.user.uid", "between 0 and 4294967295"),
    "uid a name": (put("process.user.uid", "root"), "process.user.uid", "must be an integer"),
    "uid a bool": (put("process.user.uid", True), "process.user.uid", "must be an integer"),
    "uid a float": (put("process.user.uid", 1.0), "process.user.uid", "must be an integer"),
    "umask too big": (put("process.user.umask", 0o1000), "process.user.umask", "between 0 and 511"),
    "additionalGids bad": (put("process.user.additionalGids", [5, "x"]), "process.user.additionalGids[1]",
                           "must be an integer"),
    "rlimit unknown": (put("process.rlimits", [{"type": "RLIMIT_FOO", "soft": 1, "hard": 1}]),
                       "process.rlimits[0].type", "unknown rlimit type 'RLIMIT_FOO'"),
    "rlimit duplicate": (add("process.rlimits", {"type": "RLIMIT_NOFILE", "soft": 1, "hard": 1}),
                         "process.rlimits[1].type", "duplicate rlimit type 'RLIMIT_NOFILE' (also process.rlimits[0])"),
    "rlimit soft above hard": (put("process.rlimits", [{"type": "RLIMIT_CORE", "soft": 2, "hard": 1}]),
                               "process.rlimits[0].soft", "above the hard limit"),
    "rlimit negative": (put("process.rlimits", [{"type": "RLIMIT_CORE", "soft": 1, "hard": -1}]),
                        "process.rlimits[0].hard", "between 0 and"),
    "rlimit without soft": (put("process.rlimits", [{"type": "RLIMIT_CORE", "hard": 1}]),
                            "process.rlimits[0].soft", "is required"),
    "capabilities a list": (put("process.capabilities", ["CAP_KILL"]), "process.capabilities", "must be an object"),
    "capability set a string": (put("process.capabilities.bounding", "CAP_KILL"), "process.capabilities.bounding",
                                "must be a list"),
    "capability not a string": (put("process.capabilities.ambient", [7]), "process.capabilities.ambient[0]",
                                "must be a string"),
    "oomScoreAdj out of range": (put("process.oomScoreAdj", 1001), "process.oomScoreAdj", "between -1000 and 1000"),
    "scheduler": (put("process.scheduler", {"policy": "SCHED_OTHER"}), "process.scheduler", "not supported"),
    "ioPriority": (put("process.ioPriority", {"class": "IOPRIO_CLASS_BE"}), "process.ioPriority", "not supported"),
    "consoleSize too wide": (put("process.consoleSize", {"height": 25, "width": 70000}), "process.consoleSize.width",
                             "between 0 and 65535"),
    "hostname too long": (put("hostname", "h" * 65), "hostname", "longer than 64 bytes"),
    "hostname without uts": (without_ns("uts"), "hostname", "needs a uts namespace"),
    "domainname without uts": (both(drop("hostname"), without_ns("uts"), put("domainname", "example")),
                               "domainname", "needs a uts namespace"),
    "mounts an object": (put("mounts", {}), "mounts", "must be a list"),
    "mount without destination": (add("mounts", {"type": "tmpfs", "source": "tmpfs"}), "mounts[7].destination",
                                  "is required"),
    "mount options a string": (add("mounts", {"destination": "/x", "options": "ro"}), "mounts[7].options",
                               "must be a list"),
    "mount destination with NUL": (add("mounts", {"destination": "/mn\0t"}), "mounts[7].destination", "NUL"),
    "idmap option": (add("mounts", {**BIND, "options": ["rbind", "idmap"]}), "mounts[7].options[1]",
                     "'idmap': id-mapped mounts are not supported"),
    "mount uidMappings": (add("mounts", {**BIND, "uidMappings": [MAPPING], "gidMappings": [MAPPING]}),
                          "mounts[7].uidMappings", "not supported"),
    "bind without source": (add("mounts", {"destination": "/mnt", "options": ["bind"]}), "mounts[7].source",
                            "needs a source"),
    "hooks a list": (put("hooks", []), "hooks", "must be an object"),
    "hook list an object": (put("hooks", {"prestart": {}}), "hooks.prestart", "must be a list"),
    "hook relative path": (put("hooks", {"createRuntime": [{"path": "true"}]}), "hooks.createRuntime[0].path",
                           "must be an absolute path"),
    "hook without path": (put("hooks", {"poststop": [{"args": ["x"]}]}), "hooks.poststop[0].path", "is required"),
    "hook timeout 0": (put("hooks", {"poststart": [{"path": "/bin/true", "timeout": 0}]}),
                       "hooks.poststart[0].timeout", "between 1 and"),
    "hook timeout a string": (put("hooks", {"poststart": [{"path": "/bin/true", "timeout": "5"}]}),
                              "hooks.poststart[0].timeout", "must be an integer"),
    "hook env bad": (put("hooks", {"prestart": [{"path": "/bin/true", "env": ["NOEQ"]}]}),
                     "hooks.prestart[0].env[0]", "KEY=VALUE"),
    "hook args not a list": (put("hooks", {"startContainer": [{"path": "/bin/true", "args": "x"}]}),
                             "hooks.startContainer[0].args", "must be a list"),
    "annotation not a string": (put("annotations", {"a": 1}), "annotations['a']", "must be a string"),
    "annotation empty key": (put("annotations", {"": "x"}), "annotations", "keys must not be empty"),
    "linux a list": (put("linux", []), "linux", "must be an object"),
    "namespaces an object": (put("linux.namespaces", {}), "linux.namespaces", "must be a list"),
    "unknown namespace": (add("linux.namespaces", {"type": "foo"}), "linux.namespaces[5].type",
                          "unknown namespace type 'foo'"),
    "namespace without type": (add("linux.namespaces", {"path": "/proc/1/ns/net"}), "linux.namespaces[5].type",
                               "is required"),
    "duplicate namespace": (add("linux.namespaces", {"type": "pid"}), "linux.namespaces[5].type",
                            "duplicate namespace type 'pid' (also linux.namespaces[0])"),
    "relative namespace path": (put("linux.namespaces", [{"type": "network", "path": "netns/x"}]),
                                "linux.namespaces[0].path", "must be an absolute path"),
    "namespace path missing": (put("linux.namespaces", [{"type": "network", "path": "/nonexistent/ns"}]),
                               "linux.namespaces[0].path", "/nonexistent/ns does not exist"),
    "namespace path of another type": (put("linux.namespaces", [{"type": "network", "path": "/proc/self/ns/pid"}]),
                                       "linux.namespaces[0].path", "/proc/self/ns/pid is a pid namespace, not a "
                                                                   "network one"),
    "namespace path a plain file": (put("linux.namespaces", [{"type": "ipc", "path": "/etc/hostname"}]),
                                    "linux.namespaces[0].path", "is not a namespace file"),
    "namespace path a device": (put("linux.namespaces", [{"type": "ipc", "path": "/dev/null"}]),
                                "linux.namespaces[0].path", "/dev/null is not a namespace file"),
    "uidMappings without user ns": (put("linux.uidMappings", [MAPPING]), "linux.uidMappings",
                                    "needs a user namespace"),
    "user ns without uid mappings": (add("linux.namespaces", {"type": "user"}), "linux.uidMappings",
                                     "a new user namespace needs uid mappings"),
    "user ns without gid mappings": (both(USERNS, drop("linux.gidMappings")), "linux.gidMappings",
                                     "a new user namespace needs gid mappings"),
    "mapping size 0": (both(USERNS, put("linux.uidMappings", [{**MAPPING, "size": 0}])), "linux.uidMappings[0].size",
                       "at least 1"),
    "mapping past 2^32": (both(USERNS, put("linux.gidMappings", [{**MAPPING, "hostID": 2**32 - 10, "size": 11}])),
                          "linux.gidMappings[0]", "goes past 4294967295"),
    "mapping overlap": (both(USERNS, add("linux.uidMappings", {"containerID": 10, "hostID": 300000, "size": 5})),
                        "linux.uidMappings[1]", "container ids overlap linux.uidMappings[0]"),
    "mapping host overlap": (both(USERNS, add("linux.uidMappings", {"containerID": 70000, "hostID": 100010,
                                                                    "size": 5})),
                             "linux.uidMappings[1]", "host ids overlap linux.uidMappings[0]"),
    "mapping without hostID": (both(USERNS, put("linux.uidMappings", [{"containerID": 0, "size": 1}])),
                               "linux.uidMappings[0].hostID", "is required"),
    "too many mappings": (both(USERNS, put("linux.uidMappings", [{"containerID": i, "hostID": i, "size": 1}
                                                                 for i in range(341)])),
                          "linux.uidMappings", "at most 340"),
    "device type": (put("linux.devices", [{"path": "/dev/x", "type": "z", "major": 1, "minor": 3}]),
                    "linux.devices[0].type", "unknown device type 'z'"),
    "device relative path": (put("linux.devices", [{"path": "dev/x", "type": "c", "major": 1, "minor": 3}]),
                             "linux.devices[0].path", "must be an absolute path"),
    "device without major": (put("linux.devices", [{"path": "/dev/x", "type": "c", "minor": 3}]),
                             "linux.devices[0].major", "is required"),
    "cgroupsPath a number": (put("linux.cgroupsPath", 5), "linux.cgroupsPath", "must be a string"),
    "resources a list": (put("linux.resources", []), "linux.resources", "must be an object"),
    "seccomp a string": (put("linux.seccomp", "default"), "linux.seccomp", "must be an object"),
    "rootfsPropagation": (put("linux.rootfsPropagation", "weird"), "linux.rootfsPropagation",
                          "unknown propagation 'weird'"),
    "maskedPaths relative": (put("linux.maskedPaths", ["proc/kcore"]), "linux.maskedPaths[0]",
                             "must be an absolute path"),
    "maskedPaths without mount ns": (without_ns("mount"), "linux.maskedPaths", "needs a mount namespace"),
    "sysctl of the host": (put("linux.sysctl", {"kernel.panic": "1"}), "linux.sysctl['kernel.panic']",
                           "not in a namespace of the container"),
    "sysctl net without netns": (both(without_ns("network"), put("linux.sysctl", {"net.ipv4.ip_forward": "1"})),
                                 "linux.sysctl['net.ipv4.ip_forward']", "needs the container's own network"),
    "sysctl net in the host netns": (both(put("linux.namespaces", [{"type": "network", "path": "/proc/self/ns/net"}]),
                                          put("linux.sysctl", {"net.ipv4.ip_forward": "1"}), drop("hostname"),
                                          drop("linux.maskedPaths"), drop("linux.readonlyPaths")),
                                     "linux.sysctl['net.ipv4.ip_forward']", "the container's own network namespace"),
    "sysctl ipc in the host ipc ns": (both(put("linux.namespaces", [{"type": "ipc", "path": "/proc/self/ns/ipc"}]),
                                           put("linux.sysctl", {"kernel.msgmax": "1"}), drop("hostname"),
                                           drop("linux.maskedPaths"), drop("linux.readonlyPaths")),
                                      "linux.sysctl['kernel.msgmax']", "needs the container's own ipc namespace"),
    "sysctl ipc without ipc ns": (both(without_ns("ipc"), put("linux.sysctl", {"kernel.shm_rmid_forced": "1"})),
                                  "linux.sysctl['kernel.shm_rmid_forced']", "needs the container's own ipc"),
    "sysctl kernel.hostname": (put("linux.sysctl", {"kernel.hostname": "x"}), "linux.sysctl['kernel.hostname']",
                               "conflicts with the hostname field"),
    "sysctl climbing out": (put("linux.sysctl", {"net/../../kernel/panic": "1"}),
                            "linux.sysctl['net/../../kernel/panic']", "is not a sysctl name"),
    "sysctl value not a string": (put("linux.sysctl", {"net.core.somaxconn": 256}),
                                  "linux.sysctl['net.core.somaxconn']", "must be a string"),
    "timeOffsets without time ns": (put("linux.timeOffsets", {"monotonic": {"secs": 1}}), "linux.timeOffsets",
                                    "needs a new time namespace"),
    "timeOffsets clock": (both(add("linux.namespaces", {"type": "time"}), put("linux.timeOffsets", {"realtime": {}})),
                          "linux.timeOffsets['realtime']", "unknown clock"),
    "timeOffsets nanosecs": (both(add("linux.namespaces", {"type": "time"}),
                                  put("linux.timeOffsets", {"boottime": {"nanosecs": 10**9}})),
                             "linux.timeOffsets['boottime'].nanosecs", "between 0 and 999999999"),
    "personality domain": (put("linux.personality", {"domain": "BSD"}), "linux.personality.domain",
                           "unknown domain 'BSD'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ERRORS), ids=list(ERRORS))
def test_each_bad_field_is_named(tmp_path: Path, case: str) -> None:
    mutate, field, problem = ERRORS[case]
    config = base()
    mutate(config)
    error = spec_error(tmp_path, config)
    assert error.field == field
    assert problem in str(error)
    assert str(error).startswith(f"{field}: ")
    assert error.exit_code == 1


def test_a_missing_bundle(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_bundle(tmp_path / "nowhere")
    assert info.value.field == "bundle"
    assert str(info.value) == f"bundle: {tmp_path / 'nowhere'} does not exist"
    (tmp_path / "file").touch()
    with pytest.raises(SpecError, match="is not a directory"):
        load_bundle(tmp_path / "file")


def test_a_missing_config(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    (bundle / "config.json").unlink()
    with pytest.raises(SpecError) as info:
        load_bundle(bundle)
    assert (info.value.field, str(info.value)) == ("config.json", f"config.json: not found in {bundle}")


@pytest.mark.parametrize(("raw", "problem"), [
    ('{"ociVersion": "1.0.0",\n  "root": }', "is not valid JSON: Expecting value at line 2 column 11"),
    ('{"ociVersion": "1.0.0"', "is not valid JSON: Expecting ',' delimiter at line 1 column 23"),
    ('{"oomScoreAdj": NaN}', "NaN is not a JSON number"),
    ("[1, 2]", "must hold a JSON object"),
    (b'{"hostname": "\xff"}', "is not UTF-8"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])  # fmt: skip
def test_config_that_is_not_a_json_object(tmp_path: Path, raw: str | bytes, problem: str) -> None:
    error = spec_error(tmp_path, raw)
    assert error.field == "config.json"
    assert problem in str(error)


def test_config_size_is_capped(tmp_path: Path) -> None:
    config = base()
    config["annotations"] = {"pad": "x" * MAX_CONFIG_BYTES}
    assert "is larger than 4 MiB" in str(spec_error(tmp_path, config))
    config["annotations"] = {"pad": "x" * (MAX_CONFIG_BYTES - len(json.dumps(base())) - 100)}
    load_bundle(make_bundle(tmp_path, config))  # just under the cap: fine


def test_a_fifo_for_config_does_not_hang(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    (bundle / "config.json").unlink()
    os.mkfifo(bundle / "config.json")
    with pytest.raises(SpecError, match=r"config\.json: is not a regular file"):
        load_bundle(bundle)


def test_a_rootfs_through_a_symlink_is_refused_as_runc_does(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    (tmp_path / "real").mkdir()
    (bundle / "link").symlink_to(tmp_path / "real")
    config = base()
    config["root"]["path"] = "link"
    error = spec_error(tmp_path, config)
    assert error.field == "root.path"
    assert "goes through a symlink" in str(error)
    config["root"]["path"] = str(tmp_path / "real")
    assert load_bundle(make_bundle(tmp_path, config)).rootfs == tmp_path / "real"


def test_the_bundle_path_is_resolved(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    (tmp_path / "alias").symlink_to(bundle)
    loaded = load_bundle(tmp_path / "alias")
    assert loaded.path == bundle.resolve()
    assert loaded.rootfs == bundle.resolve() / "rootfs"


def test_the_default_spec_loads(tmp_path: Path) -> None:
    loaded = load_bundle(make_bundle(tmp_path, default_spec()))
    assert loaded.process.terminal is True
    assert loaded.root_readonly is True
    assert [ns.type for ns in loaded.linux.namespaces] == ["pid", "network", "ipc", "uts", "mount"]
    assert loaded.warnings == ()
    rootless = load_bundle(make_bundle(tmp_path, default_spec(rootless=True)))
    assert rootless.linux.uid_mappings == (IdMapping(0, os.geteuid(), 1),)
    assert rootless.linux.creates("user") and not rootless.linux.creates("network")


FULL: Config = {
    "ociVersion": "1.2.0",
    "root": {"path": "rootfs", "readonly": True},
    "process": {
        "terminal": True,
        "consoleSize": {"height": 25, "width": 80},
        "user": {"uid": 1, "gid": 2, "umask": 0o22, "additionalGids": [5, 6]},
        "args": ["/bin/sh", "-c", "echo hi"],
        "env": ["PATH=/bin", "EMPTY=", "EQ=a=b"],
        "cwd": "/home/../root",
        "capabilities": {"bounding": ["CAP_KILL", "CAP_CHOWN"], "effective": ["CAP_KILL"], "ambient": []},
        "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096},
                    {"type": "RLIMIT_CORE", "soft": 0, "hard": 2**64 - 1}],
        "noNewPrivileges": True,
        "oomScoreAdj": -999,
        "apparmorProfile": "docker-default",
        "selinuxLabel": "",
    },
    "hostname": "box",
    "domainname": "example.test",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/data", "type": "none", "source": "volumes/data", "options": ["rbind", "ro", "rprivate"]},
        {"destination": "tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "size=1m", "mode=1777"]},
    ],
    "hooks": {
        "createRuntime": [{"path": "/usr/bin/setup-net", "args": ["setup-net", "-v"], "env": ["A=1"], "timeout": 5}],
        "poststop": [{"path": "/usr/sbin/cleanup"}],
        "futureHook": [{"path": "ignored"}],
    },
    "annotations": {"com.example.key": "value", "empty": ""},
    "linux": {
        "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"},
                       {"type": "user"}, {"type": "cgroup", "path": "/proc/self/ns/cgroup"}, {"type": "time"}],
        "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
        "gidMappings": [{"containerID": 0, "hostID": 100000, "size": 1000},
                        {"containerID": 1000, "hostID": 200000, "size": 10}],
        "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o666, "uid": 0},
                    {"path": "/dev/fifo", "type": "p"}],
        "cgroupsPath": "../../escape/attempt",
        "resources": {"pids": {"limit": 100}},
        "seccomp": {"defaultAction": "SCMP_ACT_ALLOW"},
        "rootfsPropagation": "rslave",
        "maskedPaths": ["/proc/kcore"],
        "readonlyPaths": ["/proc/sys"],
        "sysctl": {"net.ipv4.ip_forward": "1", "kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "20",
                   "kernel.domainname": "example.test"},
        "timeOffsets": {"monotonic": {"secs": -3600}, "boottime": {"secs": 86400, "nanosecs": 5}},
        "personality": {"domain": "LINUX32"},
        "mountLabel": "system_u:object_r:svirt_sandbox_file_t:s0",
        "someFutureField": {"whatever": 1},
    },
    "vm": {"hypervisor": {"path": "/ignored"}},
}  # fmt: skip


def test_a_full_config_round_trips_into_the_dataclasses(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, FULL)
    loaded = load_bundle(bundle)
    assert loaded.config == FULL
    assert (loaded.path, loaded.rootfs, loaded.root_readonly) == (bundle, bundle / "rootfs", True)
    assert loaded.oci_version == "1.2.0"

    p = loaded.process
    assert p.args == ("/bin/sh", "-c", "echo hi")
    assert p.env == ("PATH=/bin", "EMPTY=", "EQ=a=b")
    assert p.cwd == "/root"
    assert (p.terminal, p.console_size) == (True, (25, 80))
    assert p.user == User(uid=1, gid=2, umask=0o22, additional_gids=(5, 6))
    assert p.rlimits == (Rlimit("RLIMIT_NOFILE", 7, 1024, 4096), Rlimit("RLIMIT_CORE", 4, 0, 2**64 - 1))
    assert p.capabilities == Capabilities(bounding=("CAP_KILL", "CAP_CHOWN"), effective=("CAP_KILL",))
    assert (p.no_new_privileges, p.oom_score_adj) == (True, -999)

    assert (loaded.hostname, loaded.domainname) == ("box", "example.test")
    proc, data, tmp = loaded.mounts
    assert proc == Mount("/proc", "proc", "proc", (), m.MountOptions())
    assert data.is_bind and not proc.is_bind
    assert (data.destination, data.type, data.source) == ("/data", "bind", str(bundle / "volumes/data"))
    rprivate = m.MS_PRIVATE | m.MS_REC
    assert data.parsed == m.MountOptions(flags=m.MS_BIND | m.MS_REC | m.MS_RDONLY, propagation=(rprivate,))
    assert (tmp.destination, tmp.parsed.flags, tmp.parsed.data) == ("/tmp", m.MS_NOSUID, "size=1m,mode=1777")

    assert loaded.hooks.createRuntime == (Hook(Path("/usr/bin/setup-net"), ("setup-net", "-v"), ("A=1",), 5),)
    assert loaded.hooks.get("poststop") == (Hook(Path("/usr/sbin/cleanup")),)
    assert loaded.hooks.prestart == loaded.hooks.startContainer == ()
    assert loaded.annotations == {"com.example.key": "value", "empty": ""}

    linux = loaded.linux
    assert linux.namespaces[6] == Namespace("cgroup", Path("/proc/self/ns/cgroup"))
    assert [ns.type for ns in linux.namespaces][-3:] == ["user", "cgroup", "time"]
    assert linux.creates("pid") and not linux.creates("cgroup") and linux.namespace("cgroup") is not None
    assert linux.uid_mappings == (IdMapping(0, 100000, 65536),)
    assert linux.gid_mappings == (IdMapping(0, 100000, 1000), IdMapping(1000, 200000, 10))
    assert linux.devices == (Device("c", "/dev/fuse", 10, 229, 0o666, 0, None), Device("p", "/dev/fifo"))
    assert linux.cgroups_path == "escape/attempt"  # ".." resolved against "/", as runc's CleanPath does
    assert (linux.resources, linux.seccomp) == ({"pids": {"limit": 100}}, {"defaultAction": "SCMP_ACT_ALLOW"})
    assert linux.rootfs_propagation == "rslave"
    assert (linux.masked_paths, linux.readonly_paths) == (("/proc/kcore",), ("/proc/sys",))
    assert linux.sysctl == FULL["linux"]["sysctl"]
    assert linux.time_offsets == {"monotonic": TimeOffset(-3600, 0), "boottime": TimeOffset(86400, 5)}
    assert linux.personality == "LINUX32"

    assert loaded.warnings == (
        "process.apparmorProfile is ignored: micropod-runtime has no LSM support",
        "linux.mountLabel is ignored: micropod-runtime does not support it",
        "mounts[2].destination 'tmp' is not absolute: taken as relative to /",
    )


def test_a_minimal_config_gets_runcs_defaults(tmp_path: Path) -> None:
    minimal = {"ociVersion": "1.0.2-dev", "root": {"path": "rootfs"}, "process": {"args": ["true"], "cwd": "/"}}
    loaded = load_bundle(make_bundle(tmp_path, minimal))
    assert loaded.process.user == User(0, 0, None, ())
    assert loaded.process.capabilities == Capabilities()  # runc: no capabilities at all
    assert loaded.process.oom_score_adj is None
    assert (loaded.hostname, loaded.mounts, loaded.annotations, loaded.root_readonly) == (None, (), {}, False)
    assert loaded.linux.namespaces == () and loaded.linux.cgroups_path is None


def test_json_null_counts_as_absent(tmp_path: Path) -> None:
    config = base()
    config.update(hostname=None, mounts=None, hooks=None, annotations=None)
    config["process"].update(env=None, rlimits=None, capabilities=None, oomScoreAdj=None)
    config["linux"].update(seccomp=None, resources=None, sysctl=None)
    loaded = load_bundle(make_bundle(tmp_path, config))
    assert (loaded.hostname, loaded.mounts, loaded.process.env, loaded.linux.seccomp) == (None, (), (), None)


@pytest.mark.parametrize(("options", "expected"), [
    (["ro", "rw"], m.MountOptions(cleared=m.MS_RDONLY)),
    (["rw", "ro", "nosuid", "nodev", "noexec"],
     m.MountOptions(flags=m.MS_RDONLY | m.MS_NOSUID | m.MS_NODEV | m.MS_NOEXEC)),
    (["bind", "shared", "runbindable"],
     m.MountOptions(flags=m.MS_BIND, propagation=(m.MS_SHARED, m.MS_UNBINDABLE | m.MS_REC))),
    (["rbind", "rro", "rnosuid"], m.MountOptions(flags=m.MS_BIND | m.MS_REC,
                                                rec_set=m.MOUNT_ATTR_RDONLY | m.MOUNT_ATTR_NOSUID)),
    (["rrw"], m.MountOptions(rec_clear=m.MOUNT_ATTR_RDONLY)),
    (["rnoatime"], m.MountOptions(rec_set=m.MOUNT_ATTR_NOATIME, rec_clear=m.MOUNT_ATTR__ATIME)),
    (["defaults", "mode=755", "size=65536k", "acl"], m.MountOptions(data="mode=755,size=65536k,acl")),
    (["tmpcopyup"], m.MountOptions(copy_up=True)),
])  # fmt: skip
def test_mount_options(options: list[str], expected: m.MountOptions) -> None:
    assert m.parse_mount_options(options) == expected


@pytest.mark.parametrize("name", ["idmap", "ridmap"])
def test_idmap_options_are_refused(name: str) -> None:
    with pytest.raises(SpecError, match=f"opts\\[1\\]: '{name}': id-mapped mounts are not supported"):
        m.parse_mount_options(["bind", name], "opts")


GOOD_IDS = ["abc", "a-b_c.d+e", "a,b", "...", "A1", "x" * 255]
BAD_IDS = ["", ".", "..", "a/b", "../x", "a b", "a:b", "é", "a\nb", "x" * 256]


@pytest.mark.parametrize("cid", GOOD_IDS)
def test_good_container_ids(cid: str) -> None:
    validate_id(cid)


@pytest.mark.parametrize("cid", BAD_IDS)
def test_bad_container_ids(cid: str) -> None:
    with pytest.raises(OciRuntimeError) as info:
        validate_id(cid)
    assert info.value.exit_code == 1
    expected = "container id cannot be empty" if not cid else "invalid container ID format"
    assert str(info.value).startswith(expected)


@needs_runc
@pytest.mark.parametrize("cid", [c for c in GOOD_IDS + BAD_IDS if len(c) < 200])
def test_container_ids_as_runc_judges_them(tmp_path: Path, cid: str) -> None:
    """``runc state`` of an id: "does not exist" when runc accepts its format, the format error when not."""
    result = subprocess.run([str(RUNC), "--root", str(tmp_path), "state", cid], capture_output=True, text=True,
                            timeout=30)  # fmt: skip
    assert result.returncode == 1
    runc_accepts = "does not exist" in result.stderr
    assert runc_accepts == (cid in GOOD_IDS), result.stderr
    if cid:
        assert runc_accepts or "invalid container ID format" in result.stderr


def runc_spec(tmp_path: Path, *flags: str) -> Config:
    target = tmp_path / ("rootless" if flags else "plain")
    target.mkdir()
    subprocess.run([str(RUNC), "spec", "--bundle", str(target), *flags], check=True, timeout=30)
    config: Config = json.loads((target / "config.json").read_text())
    return config


@needs_runc
@pytest.mark.parametrize("rootless", [False, True])
def test_default_spec_is_runcs_but_for_the_version(tmp_path: Path, rootless: bool) -> None:
    theirs = runc_spec(tmp_path, *(["--rootless"] if rootless else []))
    ours = default_spec(rootless=rootless)
    # runc 1.1.5 writes "1.0.2-dev", the runtime-spec it was built with; ours is the one we implement.
    assert (theirs.pop("ociVersion"), ours.pop("ociVersion")) == ("1.0.2-dev", "1.2.0")
    assert ours == theirs


def test_default_spec_is_fresh_each_call() -> None:
    first = default_spec()
    first["process"]["args"].append("changed")
    assert default_spec()["process"]["args"] == ["sh"]
    assert copy.deepcopy(default_spec(rootless=True)) == default_spec(rootless=True)


def test_features_document_shape() -> None:
    doc = features()
    assert json.loads(json.dumps(doc)) == doc
    assert (doc["ociVersionMin"], doc["ociVersionMax"]) == ("1.0.0", "1.2.0")
    assert doc["hooks"] == ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"]
    assert doc["mountOptions"] == sorted(doc["mountOptions"]) and "idmap" not in doc["mountOptions"]
    linux = doc["linux"]
    assert linux["namespaces"] == ["cgroup", "ipc", "mount", "network", "pid", "time", "user", "uts"]
    assert linux["capabilities"][0] == "CAP_CHOWN" and linux["capabilities"][40] == "CAP_CHECKPOINT_RESTORE"
    assert linux["cgroup"] == {"v1": True, "v2": True, "systemd": False, "systemdUser": False, "rdma": False}
    seccomp = linux["seccomp"]
    assert seccomp["enabled"] is True
    assert set(seccomp["supportedFlags"]) <= set(seccomp["knownFlags"])
    assert "SCMP_ACT_ERRNO" in seccomp["actions"] and "SCMP_CMP_MASKED_EQ" in seccomp["operators"]
    for lsm in ("apparmor", "selinux", "intelRdt"):
        assert linux[lsm] == {"enabled": False}
    assert linux["mountExtensions"] == {"idmap": {"enabled": False}}
    assert all(isinstance(v, str) for v in doc["annotations"].values())
    assert doc["potentiallyUnsafeConfigAnnotations"] == []


@needs_runc
def test_features_recognise_what_runc_does(tmp_path: Path) -> None:
    theirs = json.loads(subprocess.run([str(RUNC), "features"], capture_output=True, check=True, timeout=30).stdout)
    ours = features()
    # acl/noacl are filesystem data, which features.md says the list should not hold; runc 1.1 lists them.
    assert set(theirs["mountOptions"]) - {"acl", "noacl"} <= set(ours["mountOptions"])
    assert set(theirs["hooks"]) == set(ours["hooks"])
    for key in ("namespaces", "capabilities"):
        assert set(theirs["linux"][key]) <= set(ours["linux"][key]), key
    for key in ("actions", "operators", "archs"):
        assert set(theirs["linux"]["seccomp"][key]) <= set(ours["linux"]["seccomp"][key]), key
