"""What `inspect` and `ps` say about a container, as data (docker's shapes, plus a microVM's own)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from micropod.context import Context
from micropod.quotas import Quotas
from micropod.runconfig import NetworkSettings, RunConfig
from micropod.state import VmRecord

STATES = ("created", "running", "restarting", "exited", "dead")


def docker_state(record: VmRecord) -> str:
    """The record's status as docker names states: a container made by `create` is "created" too."""
    return "created" if record.status == "configured" else record.status


def iso(ts: float | None) -> str:
    if ts is None:
        return "0001-01-01T00:00:00Z"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def load_settings(ctx: Context, vm_id: str) -> NetworkSettings:
    cfg = RunConfig.load_if_present(ctx.root.vm(vm_id).config)
    return cfg.network if cfg else NetworkSettings()


def ports_column(settings: NetworkSettings) -> str:
    return ", ".join(str(port) for port in settings.ports)


def network_inspect(settings: NetworkSettings) -> dict[str, Any]:
    """docker's NetworkSettings block, plus the TAP and bridge a microVM has."""
    ports: dict[str, list[dict[str, str]]] = {}
    for port in settings.ports:
        ports.setdefault(f"{port.guest_port}/{port.protocol}", []).append(
            {"HostIp": port.host_ip or "0.0.0.0", "HostPort": str(port.host_port)})
    if not settings.enabled:
        return {"Mode": settings.mode, "IPAddress": "", "MacAddress": "", "Gateway": "", "IPPrefixLen": 0,
                "Ports": {}}
    from micropod.net.lifecycle import network_of

    network = network_of(settings)
    return {"Mode": settings.mode, "Bridge": settings.bridge, "Tap": settings.tap, "IPAddress": settings.ip,
            "IPPrefixLen": network.subnet.prefixlen, "Gateway": str(network.gateway),
            "MacAddress": settings.mac, "Ports": ports}


def container_inspect(ctx: Context, record: VmRecord) -> dict[str, Any]:
    vm_dir = ctx.root.vm(record.id)
    cfg = RunConfig.load_if_present(vm_dir.config)
    vmm = record.vmm
    network = network_inspect(cfg.network if cfg else NetworkSettings())
    return {
        "Id": record.id,
        "Created": iso(record.created),
        "Path": record.argv[0] if record.argv else "",
        "Args": record.argv[1:],
        "State": {
            "Status": docker_state(record),
            "Running": record.status == "running",
            "Dead": record.status == "dead",
            "Pid": vmm.pid if vmm and vmm.alive() else 0,
            "ExitCode": record.exit_code if record.exit_code is not None else 0,
            "Error": record.error or "",
            "StartedAt": iso(record.started),
            "FinishedAt": iso(record.finished),
            "MonitorAlive": bool(record.monitor and record.monitor.alive()),
        },
        "Image": f"sha256:{record.image_id}",
        "Name": f"/{record.name}",
        "Pod": record.pod,  # podman's: the id of the pod whose VM runs it, or ""
        "RestartCount": record.restart_count,
        "Config": {
            "Hostname": cfg.container.hostname if cfg else "",
            "User": cfg.container.user if cfg else "",
            "Env": list(cfg.container.env) if cfg else [],
            "Cmd": record.argv,
            "Image": record.image,
            "WorkingDir": cfg.container.cwd if cfg else "",
        },
        "HostConfig": {
            "AutoRemove": bool(record.auto_remove),
            "RestartPolicy": {"Name": cfg.restart.name if cfg else "no",
                              "MaximumRetryCount": cfg.restart.max_retries if cfg else 0},
            "LogConfig": {"Type": "json-file", "Config": {
                "max-size": str(cfg.log.max_size) if cfg and cfg.log.max_size else "",
                "max-file": str(cfg.log.max_files) if cfg else "1"}},
            "Memory": _memory(record, cfg),
            "NanoCpus": _nano_cpus(record, cfg),
            "PidsLimit": cfg.container.pids_limit if cfg else 0,
            **_quotas(cfg),
            "NetworkMode": cfg.network.mode if cfg else "none",
            "PortBindings": network["Ports"],
        },
        "NetworkSettings": network,
        "VM": {
            "Backend": record.backend,
            "Vcpus": cfg.vcpus if cfg else 0,
            "MemoryMiB": cfg.memory_mib if cfg else 0,
            "Kernel": cfg.kernel if cfg else "",
            "SystemImage": cfg.system if cfg else "",
            "Rootfs": cfg.rootfs if cfg else "",
            "Dir": str(vm_dir.path),
            "ConsoleLog": str(vm_dir.console_log),
        },
        "Mounts": _mounts(cfg),
        "LogPath": str(vm_dir.container_log),
        "MetadataService": metadata_service(cfg, record),
    }


def metadata_service(cfg: RunConfig | None, record: VmRecord) -> dict[str, Any]:
    """Whether the VM has a metadata service, where, and why not."""
    from micropod.metadata.tree import ADDRESS, PORT

    if record.pod:
        return {"Enabled": False, "Reason": "a pod's VM has no metadata service yet"}
    if cfg is None or not cfg.network.enabled:
        return {"Enabled": False, "Reason": "the VM has no network (--network none)"}
    server = "MMDS V2" if record.backend == "firecracker" else "micropod's, on the VM's gateway"
    return {"Enabled": True, "Address": f"http://{ADDRESS}:{PORT}", "Server": server,
            "UserDataKeys": sorted(cfg.user_data)}


def _memory(record: VmRecord, cfg: RunConfig | None) -> int:
    """docker's HostConfig.Memory: the VM's, or in a pod the container's own cgroup limit (0: none)."""
    if cfg is None:
        return 0
    return cfg.container.memory_limit if record.pod else cfg.memory_mib << 20


def _nano_cpus(record: VmRecord, cfg: RunConfig | None) -> int:
    if cfg is None:
        return 0
    return int(cfg.container.cpu_quota * 1e9) if record.pod else int((cfg.cpu_limit or cfg.vcpus) * 1e9)


def _quotas(cfg: RunConfig | None) -> dict[str, Any]:
    """docker's names for the quotas, and micropod's NetworkRate (bytes per second each way)."""
    quotas = cfg.quotas if cfg else Quotas()

    def rates(field: str) -> list[dict[str, Any]]:
        return [{"Path": rate.target or "*", "Rate": getattr(rate.limits, field)}
                for rate in quotas.disk_rates if getattr(rate.limits, field)]

    return {"CpuShares": quotas.cpu_shares, "CpusetCpus": quotas.cpuset_cpus,
            "MemoryReservation": quotas.memory_reservation_mib << 20,
            "BlkioDeviceReadBps": rates("read_bps"), "BlkioDeviceWriteBps": rates("write_bps"),
            "BlkioDeviceReadIOps": rates("read_iops"), "BlkioDeviceWriteIOps": rates("write_iops"),
            "NetworkRate": quotas.network_rate}


def _mounts(cfg: RunConfig | None) -> list[dict[str, Any]]:
    """docker's Mounts: the container's volumes, binds and tmpfs."""
    if cfg is None:
        return []
    spec = cfg.container
    return ([{"Type": "volume", "Name": v.name, "Source": v.path, "Destination": v.target, "RW": not v.read_only}
             for v in spec.volumes]
            + [{"Type": "bind", "Source": b.source, "Destination": b.target, "RW": not b.read_only}
               for b in spec.binds]
            + [{"Type": "tmpfs", "Source": "", "Destination": t.target, "RW": True} for t in spec.tmpfs])
