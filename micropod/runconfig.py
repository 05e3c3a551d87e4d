"""What one `run` asked for, resolved against the image config with docker's rules, as plain data.

The CLI writes it to the VM's config.json; the monitor reads it back and acts on it.
"""

from __future__ import annotations

import os
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from micropod.errors import StateError, UsageError
from micropod.fsutil import PRIVATE_FILE, atomic_write
from micropod.metadata.tree import Identity
from micropod.net.ports import PortMapping
from micropod.quotas import Quotas
from micropod.state import records

# config.json of a VM. 0: before records had versions; 1: the same fields, versioned; 2: the container's
# volumes, binds, tmpfs and read_only (absent in older records: none, and a writable root); 3: a pod's
# container's memory_limit and cpu_quota (absent: none); 4: quotas (absent: none); 5: user_data, what the
# metadata service serves under /latest/user-data (absent: nothing); 6: the log's cri_path, a second copy of the
# output in kubelet's CRI format (absent: none); 7: the network's netns and gateway, a CNI pod's, and a bind's
# entry of its pod's shared directory (absent: none); 8: a pod's container's cpu_shares, cpuset_cpus and
# cpuset_mems, and a container's sysctls (absent: none).
RUN_CONFIG = records.RecordKind("VM's config.json", upgrades=(lambda raw: raw,) * 8)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class SecurityOptions:
    """docker's --privileged, --cap-add/--cap-drop and --security-opt, as the agent's bundle applies them;
    ``seccomp`` is "default", "unconfined" or a profile's JSON."""

    privileged: bool = False
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()
    seccomp: str = "default"
    no_new_privileges: bool = False
    vmm_confinement: bool = True  # the VMM's own seccomp sandbox; --security-opt vmm-confinement=off lifts it


@dataclass(frozen=True)
class VolumeMount:
    """A named volume (micropod/volumes.py) at ``target`` in the container; ``path`` is its disk image."""

    name: str
    target: str
    path: str
    read_only: bool = False


POD_SHARE_TAG = "podshare"  # the virtio-9p tag of a pod's shared directory


def bind_tag(index: int) -> str:
    """The virtio-9p mount tag of a container's ``index``-th bind mount."""
    return f"bind{index}"


@dataclass(frozen=True)
class BindMount:
    """-v /host/dir:/path[:ro]: the host directory ``source`` (resolved when the container is made) at
    ``target``, shared with the guest over virtio-9p by the tag ``bind<index>``; or, for a pod's container,
    ``source`` (a directory or a file) bound on the host at the entry ``shared`` of the pod's one shared
    directory (micropod/service/podshare.py)."""

    source: str
    target: str
    read_only: bool = False
    shared: str = ""


@dataclass(frozen=True)
class DeviceMapping:
    """A device of the VM's own kernel given to the container (micropod/agent/devices.py)."""

    path: str
    container_path: str
    permissions: str = "rwm"

    @classmethod
    def requested(cls, path: str, container_path: str = "", permissions: str = "") -> DeviceMapping:
        """A request as docker and containerd take one (no container path: the device's own, no permissions:
        rwm), checked: UsageError naming what cannot be given."""
        from micropod.agent.devices import check_request

        mapping = cls(path, container_path or path, permissions or "rwm")
        problem = check_request(mapping.path, mapping.container_path, mapping.permissions)
        if problem:
            raise UsageError(problem)
        return mapping


@dataclass(frozen=True)
class TmpfsMount:
    """--tmpfs PATH[:OPTIONS]: a tmpfs at ``target``, with docker's defaults and then ``options``."""

    target: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContainerSpec:
    """The process the agent starts; field names are the agent protocol's spec keys."""

    args: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str = "/"
    user: str = ""
    hostname: str = ""
    tty: bool = False
    stdin: bool = False
    hosts: str | None = None
    resolv_conf: str | None = None
    security: SecurityOptions = field(default_factory=SecurityOptions)
    volumes: tuple[VolumeMount, ...] = ()
    tmpfs: tuple[TmpfsMount, ...] = ()
    read_only: bool = False  # --read-only: the container's root
    pids_limit: int = 0  # --pids-limit: the container's cgroup pids.max inside the VM; 0 is none
    binds: tuple[BindMount, ...] = ()
    devices: tuple[DeviceMapping, ...] = ()
    # A pod's container: its --memory (bytes), --cpus, --cpu-shares and cpuset as its cgroup's limits inside the
    # pod's VM; 0 (or "") is none.
    memory_limit: int = 0
    cpu_quota: float = 0.0
    cpu_shares: int = 0
    cpuset_cpus: str = ""
    cpuset_mems: str = ""
    sysctls: dict[str, str] = field(default_factory=dict)  # --sysctl, a CRI pod's: namespaced ones only

    def limits(self) -> dict[str, Any]:
        """The cgroup limits, under the agent's keys (its update message and spec share them)."""
        return {"pids_limit": self.pids_limit, "memory_limit": self.memory_limit, "cpu_quota": self.cpu_quota,
                "cpu_shares": self.cpu_shares, "cpuset_cpus": self.cpuset_cpus, "cpuset_mems": self.cpuset_mems}

    def to_agent(self, rootfs: dict[str, str], volume_disks: tuple[str, ...] = ()) -> dict[str, Any]:
        """The agent's spec; ``volume_disks`` are the guest's devices of the volumes, in order."""
        spec = asdict(self)
        spec.update(spec.pop("security"))  # the agent's spec keys: privileged, cap_add, cap_drop, seccomp...
        del spec["vmm_confinement"]  # the host's business, not the guest's
        spec["volumes"] = [{"device": disk, "target": volume.target, "read_only": volume.read_only}
                           for volume, disk in zip(self.volumes, volume_disks, strict=True)]
        spec["binds"] = [{"tag": bind_tag(i), "target": bind.target, "read_only": bind.read_only} if not bind.shared
                         else {"tag": POD_SHARE_TAG, "subpath": bind.shared, "target": bind.target,
                               "read_only": bind.read_only}
                         for i, bind in enumerate(self.binds)]
        spec["args"] = list(self.args)
        spec["env"] = list(self.env)
        spec["rootfs"] = rootfs
        return spec


@dataclass(frozen=True)
class NetworkSettings:
    """A VM's place on the host network: ``mode`` "bridge" (one NIC on ``bridge``), "cni" (one NIC whose TAP is in
    the CNI pod's namespace ``netns``, joined to what CNI made there; the CRI server set it up) or "none"."""

    mode: str = "none"
    bridge: str = ""
    subnet: str = ""
    ip: str = ""
    mac: str = ""
    tap: str = ""
    ports: tuple[PortMapping, ...] = ()
    netns: str = ""
    gateway: str = ""

    @property
    def enabled(self) -> bool:
        """On micropod's own bridge, with its rules and lease."""
        return self.mode == "bridge"

    @property
    def has_nic(self) -> bool:
        return self.mode in ("bridge", "cni")

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> NetworkSettings:
        ports = tuple(PortMapping(**p) for p in raw.pop("ports", ()))
        return cls(ports=ports, **raw)


@dataclass(frozen=True)
class LogOptions:
    """docker's json-file options: rotate at ``max_size`` bytes (0: never), keep ``max_files`` files."""

    max_size: int = 0
    max_files: int = 1
    cri_path: str = ""  # a CRI container's log_path: the output again, in kubelet's format (micropod/containerlog.py)


@dataclass(frozen=True)
class RestartPolicy:
    """docker's --restart: no, on-failure[:N], always, unless-stopped; N=0 means no limit."""

    name: str = "no"
    max_retries: int = 0

    def wants_restart(self, exit_code: int, restarts_so_far: int, stopped_by_user: bool) -> bool:
        if self.name == "no" or stopped_by_user:
            return False
        if self.name == "on-failure":
            return exit_code != 0 and (self.max_retries == 0 or restarts_so_far < self.max_retries)
        return True

    @classmethod
    def parse(cls, text: str) -> RestartPolicy:
        name, _, count = text.strip().partition(":")
        if name not in ("no", "on-failure", "always", "unless-stopped"):
            raise UsageError(f"invalid --restart {text!r}: use no, on-failure[:N], always or unless-stopped")
        if count and (name != "on-failure" or not count.isdigit()):
            raise UsageError(f"invalid --restart {text!r}: only on-failure takes a maximum retry count")
        return cls(name, int(count or 0))


def restart_backoff(restarts: int) -> float:
    """docker's delay before a restart: 100 ms, doubling each time, at most a minute."""
    return float(min(60.0, 0.1 * (2 ** min(restarts, 10))))


@dataclass(frozen=True)
class RunConfig:
    vm_id: str
    name: str
    image: str
    image_id: str
    backend: str
    kernel: str
    system: str
    rootfs: str
    vcpus: int
    memory_mib: int
    container: ContainerSpec
    auto_remove: bool = False
    stop_signal: int = int(signal.SIGTERM)
    boot_timeout: float = 60.0
    upper_size: int = 10 << 30
    cpu_limit: float = 0.0  # --cpus as given (0.5: half a CPU's time, on one vCPU); 0 is the vCPUs' count
    labels: dict[str, str] = field(default_factory=dict)
    log: LogOptions = field(default_factory=LogOptions)
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    quotas: Quotas = field(default_factory=Quotas)
    user_data: dict[str, Any] = field(default_factory=dict)  # --metadata, --metadata-file

    def metadata_identity(self) -> Identity:
        digest = self.image_id if ":" in self.image_id else f"sha256:{self.image_id}"  # the image's config digest
        return Identity(self.vm_id, self.name, self.image, digest, self.network.ip,
                        self.container.hostname or self.vm_id[:12], dict(self.labels))

    def dump(self, path: Path) -> None:
        """Write atomically: a reader never sees half a config."""
        atomic_write(path, records.encode(RUN_CONFIG, asdict(self)), mode=PRIVATE_FILE)  # -e secrets

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        found = cls.load_if_present(path)
        if found is None:
            raise StateError(f"{path}: the {RUN_CONFIG.name} is gone")
        return found

    @classmethod
    def load_if_present(cls, path: Path) -> RunConfig | None:
        """The config, or None for a VM whose directory is gone; StateError, naming the file, for one that is
        there but does not fit (never None: a caller would take the VM for one without a config)."""
        raw = records.decode(RUN_CONFIG, path)
        if raw is None:
            return None
        try:
            return cls._from_json(raw)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise records.not_understood(RUN_CONFIG, path, exc) from None

    @classmethod
    def _from_json(cls, raw: dict[str, Any]) -> RunConfig:
        container = raw.pop("container")
        container["args"] = tuple(container["args"])
        container["env"] = tuple(container["env"])
        container["volumes"] = tuple(VolumeMount(**volume) for volume in container.get("volumes") or ())
        container["binds"] = tuple(BindMount(**bind) for bind in container.get("binds") or ())
        container["devices"] = tuple(DeviceMapping(**device) for device in container.get("devices") or ())
        container["tmpfs"] = tuple(TmpfsMount(m["target"], tuple(m["options"])) for m in container.get("tmpfs") or ())
        log = LogOptions(**raw.pop("log", {}))
        restart = RestartPolicy(**raw.pop("restart", {}))
        network = NetworkSettings.from_json(raw.pop("network", {}))
        quotas = Quotas.from_json(raw.pop("quotas", {}))
        saved: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                 for k, v in (container.pop("security", None) or {}).items()}
        security = SecurityOptions(**saved)
        return cls(container=ContainerSpec(security=security, **container), log=log, restart=restart,
                   network=network, quotas=quotas, **raw)



def merge_command(
    entrypoint: tuple[str, ...],
    cmd: tuple[str, ...],
    override_entrypoint: str | None,
    args: tuple[str, ...],
) -> tuple[str, ...]:
    """docker's rule: --entrypoint replaces the entrypoint and drops the image's Cmd."""
    if override_entrypoint is not None:
        entrypoint = (override_entrypoint,) if override_entrypoint else ()
        cmd = ()
    if args:
        cmd = args
    command = entrypoint + cmd
    if not command:
        raise UsageError("no command specified: the image has no Entrypoint or Cmd; give one")
    return command


def parse_env_file(path: Path) -> list[str]:
    """docker's --env-file: KEY=VALUE lines, '#' comments, a bare KEY takes the host's value."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"--env-file {path}: {exc.strerror}") from exc
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def merge_env(image_env: tuple[str, ...], overrides: list[str], hostname: str) -> tuple[str, ...]:
    env: dict[str, str] = {}
    for item in image_env:
        key, _, value = item.partition("=")
        env[key] = value
    for item in overrides:
        key, sep, value = item.partition("=")
        if not key or any(c.isspace() for c in key):
            raise UsageError(f"invalid environment variable {item!r}: use KEY=VALUE")
        if sep:
            env[key] = value
        elif key in os.environ:
            env[key] = os.environ[key]
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOSTNAME", hostname)
    return tuple(f"{k}={v}" for k, v in env.items())


def parse_signal(name: str | None, default: int = int(signal.SIGTERM)) -> int:
    """A signal given as 'SIGTERM', 'TERM' or '15'."""
    if not name:
        return default
    text = name.strip().upper()
    if text.isdigit():
        number = int(text)
        if 0 < number < signal.NSIG:
            return number
    else:
        text = text if text.startswith("SIG") else f"SIG{text}"
        if text in signal.Signals.__members__:
            return int(signal.Signals[text])
    raise UsageError(f"invalid signal {name!r}")


# docker's json-file default is unbounded; a guest that writes without end would fill the host's disk, so
# micropod bounds every container log at 3 files of 10 MiB unless told otherwise (max-size=-1: unbounded).
DEFAULT_LOG = LogOptions(max_size=10 << 20, max_files=3)


def parse_log_opts(items: tuple[str, ...] | list[str]) -> LogOptions:
    """--log-opt max-size=10m --log-opt max-file=3; the default size comes from MICROPOD_LOG_MAX_SIZE,
    else DEFAULT_LOG."""
    options = dict(item.partition("=")[::2] for item in items)
    unknown = set(options) - {"max-size", "max-file"}
    if unknown:
        raise UsageError(f"unknown --log-opt {sorted(unknown)[0]!r}: micropod supports max-size and max-file")
    size_text = options.get("max-size") or os.environ.get("MICROPOD_LOG_MAX_SIZE", "")
    if not size_text and "max-file" not in options:
        return DEFAULT_LOG
    try:
        size = _parse_size(size_text) if size_text and size_text != "-1" else 0
        files = int(options.get("max-file", "1"))
    except (UsageError, ValueError):
        raise UsageError(f"invalid --log-opt {' '.join(items)!r}: use max-size=10m, max-file=3") from None
    if files < 1 or size < 0:
        raise UsageError("--log-opt max-file must be at least 1 and max-size not negative")
    return LogOptions(size, files)


def _parse_size(text: str) -> int:
    """docker's sizes: 100, 10k, 10m, 1g (binary multiples, an optional trailing 'b')."""
    value = text.strip().lower().removesuffix("b")
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(value[-1:], 1)
    number = value[:-1] if value[-1:] in "kmg" else value
    return int(float(number) * scale)
