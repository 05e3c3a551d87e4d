"""Sandbox networking through CNI, as containerd's CRI plugin does it: a network namespace per sandbox, the
configuration directory's first network set up in it by its plugins, and the VM's TAP joined to CNI's
interface there (micropod/net/podlink.py). With no configuration, sandboxes use micropod's own bridge.

A sandbox's CNI state is a record of its own under ``ROOT/cri/networks`` (with the namespace under
``ROOT/cri/netns``), written before ADD and removed only after DEL succeeded, so DEL runs once: at
StopPodSandbox, or at RemovePodSandbox, or, for a sandbox removed meanwhile by other means (`micropod pod rm`,
a crash), when the server next lists or starts sandboxes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from micropod.errors import NetworkError
from micropod.fsutil import PRIVATE_DIR, PRIVATE_FILE, atomic_write
from micropod.jsonfile import read_json_object
from micropod.net import cni, netns
from micropod.net.podlink import POD_TAP, PodLink, check_mac, interface_mac
from micropod.paths import StateRoot
from micropod.runconfig import NetworkSettings

log = logging.getLogger("micropod.cri")
IFNAME = "eth0"
MAX_RECORD = 1 << 20


@dataclass(frozen=True)
class CniOptions:
    conf_dir: Path = cni.DEFAULT_CONF_DIR
    bin_dirs: tuple[Path, ...] = cni.DEFAULT_BIN_DIRS


@dataclass(frozen=True)
class PodIdentity:
    """What CNI_ARGS tells the plugins, as kubelet's runtimes pass it."""

    sandbox_id: str
    name: str
    namespace: str
    uid: str

    def args(self) -> tuple[tuple[str, str], ...]:
        return (("IgnoreUnknown", "1"), ("K8S_POD_NAMESPACE", self.namespace), ("K8S_POD_NAME", self.name),
                ("K8S_POD_INFRA_CONTAINER_ID", self.sandbox_id), ("K8S_POD_UID", self.uid))


class PodNetworks:
    def __init__(self, root: StateRoot, options: CniOptions) -> None:
        self.options = options
        self.records = root.path / "cri" / "networks"
        self.namespaces = root.path / "cri" / "netns"
        self.cni = cni.Cni(options.bin_dirs)

    def conf(self) -> cni.NetworkConf | None:
        """Read each time, as containerd watches the directory: a configuration may be installed later."""
        return cni.find_conf(self.options.conf_dir)

    def describe(self) -> tuple[bool, str, str]:
        """NetworkReady's status, reason and message."""
        try:
            conf = self.conf()
        except NetworkError as exc:
            return False, "NetworkPluginNotReady", str(exc)
        if conf is None:
            return True, "", (f"no CNI configuration in {self.options.conf_dir}: sandboxes use micropod's own "
                              "bridge network")
        return True, "", f"CNI network {conf.name!r} from {conf.source}"

    def _record_path(self, sandbox_id: str) -> Path:
        return self.records / f"{sandbox_id}.json"

    def _save(self, sandbox_id: str, record: dict[str, Any]) -> None:
        self.records.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        atomic_write(self._record_path(sandbox_id), json.dumps(record).encode(), mode=PRIVATE_FILE)

    def setup(self, conf: cni.NetworkConf, pod: PodIdentity, port_mappings: list[dict[str, Any]]) -> NetworkSettings:
        """The sandbox's namespace and its CNI network, and what its VM's NIC takes. A failure leaves nothing:
        what was made is torn down before the error."""
        path = self.namespaces / pod.sandbox_id
        mappings = tuple({"hostPort": m["host_port"], "containerPort": m["container_port"],
                          "protocol": m["protocol"], "hostIP": m["host_ip"]} for m in port_mappings)
        who = cni.Attachment(pod.sandbox_id, path, IFNAME, pod.args(), mappings)
        record: dict[str, Any] = {"conf": conf.as_json(), "netns": str(path), "args": [list(a) for a in who.args],
                                  "port_mappings": list(mappings), "result": None}
        self._save(pod.sandbox_id, record)  # before anything is made: a crash from here on is torn down later
        try:
            netns.create(path)
            result = record["result"] = self.cni.add(conf, who)
            self._save(pod.sandbox_id, record)
            address = cni.address_of(result, IFNAME)
            mac = check_mac(address.mac, f"the CNI result's MAC of {IFNAME}") if address.mac else \
                interface_mac(path, IFNAME)
            PodLink(path, IFNAME, mac, address.interface.ip).setup()
        except BaseException:
            self.teardown_or_log(pod.sandbox_id)
            raise
        log.info("sandbox %s: CNI network %s gave %s", pod.sandbox_id[:12], conf.name, address.interface)
        return NetworkSettings(mode="cni", ip=str(address.interface.ip), subnet=str(address.interface.network),
                               mac=mac, tap=POD_TAP, netns=str(path),
                               gateway=str(address.gateway) if address.gateway else "")

    def teardown(self, sandbox_id: str) -> None:
        """CNI DEL and the namespace's removal, once: a sandbox with no record has nothing left."""
        path = self._record_path(sandbox_id)
        record = read_json_object(path, MAX_RECORD, f"sandbox {sandbox_id}'s CNI record {path}", NetworkError,
                                  missing_ok=True)
        if record is None:
            return
        try:
            raw_conf = dict(record["conf"])
            source = str(raw_conf.pop("source"))
            conf = cni.NetworkConf.from_json(raw_conf, source)
            who = cni.Attachment(sandbox_id, Path(str(record["netns"])), IFNAME,
                                 tuple((str(k), str(v)) for k, v in record["args"]),
                                 tuple(record["port_mappings"]))
            result = record["result"]
        except (KeyError, TypeError, ValueError) as exc:
            raise NetworkError(f"sandbox {sandbox_id}: its CNI record {path} is damaged: {exc}") from None
        self.cni.delete(conf, who, result if isinstance(result, dict) else None)
        netns.delete(who.netns)
        path.unlink(missing_ok=True)
        log.info("sandbox %s: CNI network %s torn down", sandbox_id[:12], conf.name)

    def teardown_or_log(self, sandbox_id: str) -> None:
        """Teardown, where another error is already on its way; the record stays for a later sweep."""
        try:
            self.teardown(sandbox_id)
        except NetworkError as exc:
            log.error("sandbox %s: tearing down its network: %s", sandbox_id[:12], exc)

    def sweep(self, live: Callable[[], set[str]]) -> None:
        """Tear down the networks of sandboxes that are gone (removed by the CLI, or by a crash mid-run). The
        records are listed before the sandboxes: a record is written only for a sandbox that exists, so one
        being set up meanwhile is among the ``live()`` ids."""
        try:
            names = os.listdir(self.records)
        except FileNotFoundError:
            return
        alive = live()
        for name in names:
            sandbox_id = name.removesuffix(".json")
            if name.endswith(".json") and sandbox_id not in alive:
                self.teardown_or_log(sandbox_id)
