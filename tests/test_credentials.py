"""Credentials: micropod's own file (0600, atomic) first, docker's config.json second."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from micropod.errors import UsageError
from micropod.image.credentials import Credentials, CredentialStore, insecure_registries, registry_host


def test_store_get_erase(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "auth.json", docker_config=tmp_path / "none.json")
    assert store.get("r.example") is None
    store.store("r.example", Credentials("u", "p:w"))
    assert stat.S_IMODE((tmp_path / "auth.json").stat().st_mode) == 0o600
    assert store.get("r.example") == Credentials("u", "p:w")
    assert store.erase("r.example") and not store.erase("r.example")
    assert store.get("r.example") is None


def test_docker_config_is_read(tmp_path: Path) -> None:
    docker = tmp_path / "config.json"
    auth = base64.b64encode(b"hub:pw").decode()
    docker.write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": auth},
                                            "r.example:5000": {"username": "a", "password": "b"}}}))
    store = CredentialStore(tmp_path / "auth.json", docker_config=docker)
    assert store.get("docker.io") == Credentials("hub", "pw")
    assert store.get("r.example:5000") == Credentials("a", "b")
    store.store("docker.io", Credentials("mine", "x"))
    assert store.get("docker.io") == Credentials("mine", "x")  # micropod's file wins


def test_registry_host() -> None:
    assert registry_host("https://index.docker.io/v1/") == "docker.io"
    assert registry_host("localhost:5000") == "localhost:5000"
    with pytest.raises(UsageError):
        registry_host("")


def test_insecure_registries(tmp_path: Path) -> None:
    path = tmp_path / "registries.json"
    assert insecure_registries(path) == frozenset()
    path.write_text('{"insecure": ["r.example:5000"]}')
    assert insecure_registries(path) == {"r.example:5000"}
    path.write_text('{"insecure": "nope"}')
    with pytest.raises(UsageError):
        insecure_registries(path)
