"""Registry credentials and registry settings: micropod's own auth file (written by `login`, mode 0600,
atomically) first, then docker's config.json (`auths` with a base64 `auth`), read only.

Registry settings (`registries.json` next to the auth file: insecure registries and mirrors) are read
and validated by micropod.image.settings.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from micropod.errors import UsageError
from micropod.fsutil import atomic_write, flock
from micropod.image.reference import DEFAULT_DOMAIN
from micropod.image.settings import registry_settings


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic(self) -> str:
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def _host_of(key: str) -> str:
    """docker keeps Docker Hub's credentials under its old index URL."""
    host = key.removeprefix("https://").removeprefix("http://").split("/", 1)[0]
    return DEFAULT_DOMAIN if host in ("index.docker.io", "registry-1.docker.io") else host


def _decode(entry: Any) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return Credentials(user, password) if sep else None
    name, secret = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(secret, str):
        return Credentials(name, secret)
    return None


def _read_auths(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read credentials file {path}: {exc}") from exc
    auths = obj.get("auths") if isinstance(obj, dict) else None
    return auths if isinstance(auths, dict) else {}


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


class CredentialSource(Protocol):
    def get(self, registry: str) -> Credentials | None: ...


@dataclass(frozen=True)
class GivenCredentials:
    """Credentials a caller handed over for one pull (the CRI's AuthConfig); never written anywhere."""

    registry: str | None  # None: for whichever registry the pull goes to
    credentials: Credentials

    def get(self, registry: str) -> Credentials | None:
        return self.credentials if self.registry in (None, registry) else None


@dataclass(frozen=True)
class CredentialStore:
    """micropod's auth file; lookups fall back to docker's config.json."""

    path: Path
    docker_config: Path | None = None

    def get(self, registry: str) -> Credentials | None:
        for path in (self.path, self.docker_config or docker_config_path()):
            for key, entry in _read_auths(path).items():
                if _host_of(key) == registry:
                    creds = _decode(entry)
                    if creds is not None:
                        return creds
        return None

    def _update(self, registry: str, entry: dict[str, str] | None) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with flock(self.path.with_name(self.path.name + ".lock")):
            auths = _read_auths(self.path)
            existed = any(_host_of(k) == registry for k in auths)
            auths = {k: v for k, v in auths.items() if _host_of(k) != registry}
            if entry is not None:
                auths[registry] = entry
            atomic_write(self.path, json.dumps({"auths": auths}, indent=2).encode() + b"\n", mode=0o600)
        return existed

    def store(self, registry: str, creds: Credentials) -> None:
        self._update(registry, {"auth": creds.basic()})

    def erase(self, registry: str) -> bool:
        """Forget the registry's credentials; False when there were none."""
        return self._update(registry, None)


def insecure_registries(path: Path) -> frozenset[str]:
    """The `insecure` list of the registry settings in `path` (the whole file is validated)."""
    return registry_settings(path).insecure


def registry_host(text: str) -> str:
    """The registry a `login SERVER` argument names (docker accepts URLs too)."""
    host = _host_of(text.strip())
    if not host:
        raise UsageError(f"invalid registry {text!r}")
    return host
