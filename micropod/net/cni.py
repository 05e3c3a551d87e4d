"""A CNI runtime, as the CNI spec (1.0) and libcni describe it: the network configuration is the first file of
the configuration directory (``.conflist``, or a single plugin's ``.conf``/``.json``), its plugins run in order
for ADD, each given the previous one's result, and in reverse for DEL, given the final result.

Plugins are the host's own binaries, found by their ``type`` in the binary directories only (a type is a bare
name), run with a minimal environment and a timeout, and what they print is bounded and checked before use.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from micropod import proc
from micropod.errors import CommandError, NetworkError

DEFAULT_CONF_DIR = Path("/etc/cni/net.d")
DEFAULT_BIN_DIRS = (Path("/opt/cni/bin"), Path("/usr/lib/cni"))
CONF_SUFFIXES = (".conflist", ".conf", ".json")
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
PLUGIN_TIMEOUT = 60.0
MAX_OUTPUT = 1 << 20
MAX_CONF = 1 << 20
_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class NetworkConf:
    """A configuration list: its name, CNI version and plugins, as the file gave them."""

    name: str
    version: str
    plugins: tuple[dict[str, Any], ...]
    source: str

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "cniVersion": self.version, "plugins": list(self.plugins), "source": self.source}

    @classmethod
    def from_json(cls, raw: Any, source: str) -> NetworkConf:
        if not isinstance(raw, dict):
            raise NetworkError(f"CNI configuration {source}: not a JSON object")
        if "plugins" not in raw:  # a single plugin's .conf
            raw = {"name": raw.get("name"), "cniVersion": raw.get("cniVersion"), "plugins": [raw]}
        name, version, plugins = raw.get("name"), raw.get("cniVersion"), raw.get("plugins")
        if not isinstance(name, str) or not name:
            raise NetworkError(f"CNI configuration {source}: 'name' must be a non-empty string")
        if version not in SUPPORTED_VERSIONS:
            raise NetworkError(f"CNI configuration {source}: cniVersion {version!r} is not one micropod speaks "
                               f"({', '.join(SUPPORTED_VERSIONS)})")
        if not isinstance(plugins, list) or not plugins or not all(isinstance(p, dict) for p in plugins):
            raise NetworkError(f"CNI configuration {source}: 'plugins' must be a non-empty list of objects")
        for plugin in plugins:
            kind = plugin.get("type")
            if not isinstance(kind, str) or not _TYPE.fullmatch(kind):
                raise NetworkError(f"CNI configuration {source}: plugin type {kind!r} is not a plugin's name")
        return cls(name, str(version), tuple(plugins), source)


def find_conf(conf_dir: Path) -> NetworkConf | None:
    """The directory's first configuration, by file name, as libcni orders them; None if there is none."""
    try:
        names = sorted(e.name for e in os.scandir(conf_dir) if e.name.endswith(CONF_SUFFIXES) and e.is_file())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise NetworkError(f"cannot read the CNI configuration directory {conf_dir}: {exc.strerror}") from None
    if not names:
        return None
    path = conf_dir / names[0]
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONF + 1)
    except OSError as exc:
        raise NetworkError(f"cannot read CNI configuration {path}: {exc.strerror}") from None
    if len(data) > MAX_CONF:
        raise NetworkError(f"CNI configuration {path} is larger than {MAX_CONF} bytes")
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise NetworkError(f"CNI configuration {path} is not valid JSON: {exc}") from None
    return NetworkConf.from_json(raw, str(path))


@dataclass(frozen=True)
class Attachment:
    """Who asks: the container (the sandbox) and where its interface goes."""

    container_id: str
    netns: Path
    ifname: str = "eth0"
    args: tuple[tuple[str, str], ...] = ()  # CNI_ARGS
    port_mappings: tuple[dict[str, Any], ...] = ()  # runtimeConfig.portMappings, for plugins that ask


@dataclass(frozen=True)
class Address:
    """What the pod's NIC takes from a result."""

    interface: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address | None
    mac: str | None


@dataclass
class Cni:
    bin_dirs: tuple[Path, ...] = DEFAULT_BIN_DIRS
    timeout: float = PLUGIN_TIMEOUT
    calls: list[str] = field(default_factory=list)  # "ADD bridge", for the debug log and the tests

    def plugin(self, kind: str) -> Path:
        for directory in self.bin_dirs:
            path = directory / kind
            if path.is_file() and os.access(path, os.X_OK):
                return path
        raise NetworkError(f"CNI plugin {kind!r} not found in {', '.join(map(str, self.bin_dirs))}")

    def _exec(self, command: str, conf: NetworkConf, plugin: dict[str, Any], who: Attachment,
              prev: dict[str, Any] | None) -> dict[str, Any] | None:
        kind = plugin["type"]
        stdin = {**plugin, "name": conf.name, "cniVersion": conf.version}
        if prev is not None:
            stdin["prevResult"] = prev
        capabilities = plugin.get("capabilities")
        if isinstance(capabilities, dict) and capabilities.get("portMappings") and who.port_mappings:
            stdin["runtimeConfig"] = {"portMappings": list(who.port_mappings)}
        env = proc.minimal_env({
            "CNI_COMMAND": command, "CNI_CONTAINERID": who.container_id, "CNI_NETNS": str(who.netns),
            "CNI_IFNAME": who.ifname, "CNI_PATH": os.pathsep.join(map(str, self.bin_dirs)),
            "CNI_ARGS": cni_args(who.args),
        })
        self.calls.append(f"{command} {kind}")
        try:
            out = proc.run([self.plugin(kind)], input=json.dumps(stdin).encode(), env=env, check=False,
                           timeout=self.timeout, output_limit=MAX_OUTPUT)
        except CommandError as exc:
            raise NetworkError(f"CNI plugin {kind} ({command}): {exc}") from None
        if out.returncode != 0:
            raise NetworkError(f"CNI plugin {kind} failed ({command}): {_error_message(out.stdout, out.stderr)}")
        if command != "ADD":
            return None
        try:
            result = json.loads(out.stdout)
        except ValueError:
            raise NetworkError(f"CNI plugin {kind} (ADD) printed no JSON result") from None
        if not isinstance(result, dict):
            raise NetworkError(f"CNI plugin {kind} (ADD) printed a result that is not a JSON object")
        return result

    def add(self, conf: NetworkConf, who: Attachment) -> dict[str, Any]:
        """Every plugin's ADD in order; on a failure, DEL of the whole list (as libcni's callers do) and the
        error."""
        result: dict[str, Any] | None = None
        try:
            for plugin in conf.plugins:
                result = self._exec("ADD", conf, plugin, who, result)
        except NetworkError:
            with contextlib.suppress(NetworkError):  # the ADD's error is the one to report
                self.delete(conf, who, result)
            raise
        assert result is not None
        return result

    def delete(self, conf: NetworkConf, who: Attachment, result: dict[str, Any] | None) -> None:
        """Every plugin's DEL, last first; each is tried, and the first failure is raised after."""
        failures: list[NetworkError] = []
        for plugin in reversed(conf.plugins):
            try:
                self._exec("DEL", conf, plugin, who, result)
            except NetworkError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]


def _error_message(stdout: bytes, stderr: bytes) -> str:
    """A plugin's error is a JSON object on stdout ({code, msg, details}); stderr when it printed none."""
    try:
        error = json.loads(stdout[:MAX_OUTPUT])
        msg, details = error.get("msg"), error.get("details")
        if isinstance(msg, str) and msg:
            return f"{msg}: {details}" if isinstance(details, str) and details else msg
    except (ValueError, AttributeError):
        pass
    return proc.stderr_tail(stderr) or proc.stderr_tail(stdout) or "no error message"


def address_of(result: dict[str, Any], ifname: str) -> Address:
    """The first IPv4 address that the result gives the sandbox's ``ifname`` (or, if none names an interface,
    the first IPv4 address at all), with its gateway and that interface's MAC."""
    if "ips" not in result and "ip4" in result:
        raise NetworkError("the CNI result is in the 0.2 format; use cniVersion 0.3.0 or later")
    interfaces, ips = result.get("interfaces", []), result.get("ips", [])
    if not isinstance(interfaces, list) or not isinstance(ips, list):
        raise NetworkError("the CNI result's 'interfaces' and 'ips' must be lists")
    chosen: tuple[dict[str, Any], ipaddress.IPv4Interface] | None = None
    for entry in ips:
        if not isinstance(entry, dict):
            raise NetworkError("the CNI result has an IP entry that is not an object")
        try:
            iface = ipaddress.ip_interface(str(entry.get("address")))
        except ValueError:
            raise NetworkError(f"the CNI result has a bad address {entry.get('address')!r}") from None
        if not isinstance(iface, ipaddress.IPv4Interface):
            continue
        index = entry.get("interface")
        named = isinstance(index, int) and 0 <= index < len(interfaces) and isinstance(interfaces[index], dict)
        if named and isinstance(index, int) and interfaces[index].get("name") == ifname:
            chosen = (entry, iface)
            break
        if chosen is None and not named:
            chosen = (entry, iface)
    if chosen is None:
        raise NetworkError(f"the CNI result gives {ifname} no IPv4 address")
    entry, iface = chosen
    gateway = None
    if entry.get("gateway") is not None:
        try:
            gateway = ipaddress.IPv4Address(str(entry["gateway"]))
        except ValueError:
            raise NetworkError(f"the CNI result has a bad gateway {entry['gateway']!r}") from None
    if iface.network.prefixlen > 30 or iface.ip in (iface.network.network_address, iface.network.broadcast_address):
        raise NetworkError(f"the CNI result's address {iface} is not a host's address on a subnet")
    mac = next((str(i["mac"]) for i in interfaces
                if isinstance(i, dict) and i.get("name") == ifname and isinstance(i.get("mac"), str)), None)
    return Address(iface, gateway, mac)


def cni_args(pairs: tuple[tuple[str, str], ...]) -> str:
    """CNI_ARGS, ``K=V;K=V``: a pod's name or uid with a ``;`` or ``=`` would smuggle in other arguments."""
    for key, value in pairs:
        if any(c in text for text in (key, value) for c in ";=\0") or not key:
            raise NetworkError(f"CNI argument {key}={value!r} has a ';', '=' or NUL")
    return ";".join(f"{k}={v}" for k, v in pairs)
