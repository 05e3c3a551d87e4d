"""Registry settings: `registries.json` in the state root, validated strictly.

    {"insecure": ["myregistry:5000"],
     "mirrors": {"docker.io": ["http://127.0.0.1:5000", "https://mirror.example/prefix"]}}

- `insecure`: registries that may be reached over plain HTTP (HTTPS is tried first, as docker does).
- `mirrors`: as containerd's registry mirrors: for an image whose registry is a key, each mirror is
  tried in order, then the registry itself. A mirror is a base URL, http or https (the scheme is used
  as written: no probing; http only to loopback or to a host listed in `insecure`), with an optional
  port and path prefix; `/v2/...` is appended to it (a trailing `/v2` is dropped first). The image
  keeps its own name; a mirror's content is verified as the registry's is (blobs by digest, a pinned
  manifest by its digest).

A bad shape is one UsageError naming the file and the field.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from micropod.errors import UsageError
from micropod.image.reference import DEFAULT_DOMAIN

FILENAME = "registries.json"
_FIELDS = ("insecure", "mirrors")
_HUB_ALIASES = frozenset({"index.docker.io", "registry-1.docker.io"})


@dataclass(frozen=True)
class RegistrySettings:
    insecure: frozenset[str] = frozenset()
    mirrors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # registry domain -> base URLs


def mirror_endpoint(url: str, where: str = "mirror") -> str:
    """The base URL of a mirror (no trailing `/` or `/v2`), or a UsageError saying what is wrong."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"{where}: invalid mirror URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UsageError(f"{where}: mirror URL {url!r} must start with http:// or https://")
    if not parts.hostname:
        raise UsageError(f"{where}: mirror URL {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise UsageError(f"{where}: mirror URL {url!r} must not carry credentials (use 'micropod login HOST')")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise UsageError(f"{where}: mirror URL {url!r} must not have a query or fragment")
    if port == 0:
        raise UsageError(f"{where}: mirror URL {url!r} has port 0")
    path = parts.path.rstrip("/")
    path = path.removesuffix("/v2").rstrip("/")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.lower(), path, "", ""))


def _registry_key(key: str, where: str) -> str:
    if not key or "/" in key or any(c.isspace() for c in key):
        raise UsageError(f"{where}: {key!r} is not a registry host (write e.g. \"docker.io\" or \"host:5000\")")
    return canonical_registry(key)


def canonical_registry(host: str) -> str:
    """Docker Hub by its one name (its index and API hosts are aliases of docker.io)."""
    host = host.lower()
    return DEFAULT_DOMAIN if host in _HUB_ALIASES else host


def parse_settings(obj: Any, path: Path | str) -> RegistrySettings:
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: must be a JSON object with 'insecure' and/or 'mirrors'")
    unknown = sorted(set(obj) - set(_FIELDS))
    if unknown:
        raise UsageError(f"{path}: unknown field {unknown[0]!r} (known: {', '.join(_FIELDS)})")
    hosts = obj.get("insecure", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise UsageError(f"{path}: 'insecure' must be a list of registry hosts")
    table = obj.get("mirrors", {})
    if not isinstance(table, dict):
        raise UsageError(f"{path}: 'mirrors' must be an object mapping a registry host to a list of mirror URLs")
    mirrors: dict[str, tuple[str, ...]] = {}
    for key, urls in table.items():
        where = f"{path}: mirrors[{json.dumps(key)}]"
        registry = _registry_key(key, where)
        if registry in mirrors:
            raise UsageError(f"{where}: registry {registry!r} is listed twice")
        if not isinstance(urls, list):
            raise UsageError(f"{where}: must be a list of mirror URLs")
        endpoints = []
        for index, url in enumerate(urls):
            if not isinstance(url, str):
                raise UsageError(f"{where}[{index}]: must be a URL string, not {type(url).__name__}")
            endpoints.append(mirror_endpoint(url, f"{where}[{index}]"))
        mirrors[registry] = tuple(endpoints)
    insecure = frozenset(h.lower() for h in hosts)
    for registry, bases in mirrors.items():
        for index, endpoint in enumerate(bases):
            _check_plain_http(endpoint, insecure, f"{path}: mirrors[{json.dumps(registry)}][{index}]")
    return RegistrySettings(frozenset(hosts), mirrors)


def _check_plain_http(endpoint: str, insecure: frozenset[str], where: str) -> None:
    """Plain HTTP only to this machine or to a host listed as insecure, as docker's mirrors: a manifest pulled
    by tag over it is what anyone on the way says it is."""
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme != "http" or parts.netloc in insecure or (parts.hostname or "") in insecure:
        return
    try:
        if ipaddress.ip_address(parts.hostname or "").is_loopback:
            return
    except ValueError:
        if parts.hostname == "localhost":
            return
    raise UsageError(f"{where}: mirror {endpoint} is plain HTTP: list {parts.netloc} in 'insecure' to allow it")


def registry_settings(path: Path) -> RegistrySettings:
    """The settings in `path`; the defaults (nothing insecure, no mirrors) when there is no such file."""
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        return RegistrySettings()
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read registry settings {path}: {exc}") from exc
    return parse_settings(obj, path)
