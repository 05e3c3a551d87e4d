"""The registry client's pure parts: challenges, loopback detection, platform selection."""

from __future__ import annotations

import re

import pytest

from micropod.errors import ImageError, RegistryError, UsageError
from micropod.image.model import DOCKER_MANIFEST, OCI_MANIFEST, Descriptor, Platform
from micropod.image.pull import parse_platform, select_platform
from micropod.image.registry import RegistryClient, RetryPolicy, _no_downgrade, is_loopback, parse_challenge

DIGEST = "sha256:" + "a" * 64


def test_parse_bearer_challenge() -> None:
    c = parse_challenge('Bearer realm="https://auth.example/token",service="registry.example",'
                        'scope="repository:library/nginx:pull,push"')
    assert c is not None and c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.example/token", "service": "registry.example",
                        "scope": "repository:library/nginx:pull,push"}


def test_parse_basic_challenge() -> None:
    c = parse_challenge('Basic realm="micropod"')
    assert c is not None and c.scheme == "basic" and c.params["realm"] == "micropod"
    assert parse_challenge("") is None


@pytest.mark.parametrize(("host", "loopback"), [
    ("localhost", True), ("localhost:5000", True), ("127.0.0.1:5000", True), ("127.9.9.9", True),
    ("[::1]:5000", True), ("registry.example:5000", False), ("10.0.0.1", False), ("docker.io", False)])
def test_loopback_registries(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_plain_http_only_where_allowed() -> None:
    assert RegistryClient("127.0.0.1:5000").allow_http
    assert not RegistryClient("registry.example").allow_http
    assert RegistryClient("registry.example", insecure=True).allow_http
    assert RegistryClient("registry.example", tls_verify=False).allow_http
    assert RegistryClient("docker.io").host == "registry-1.docker.io"


def test_backoff_is_bounded_and_honours_retry_after() -> None:
    client = RegistryClient("localhost", retry=RetryPolicy(attempts=4, backoff=0.5, max_delay=3.0))
    assert [client._delay(i, None) for i in range(4)] == [0.5, 1.0, 2.0, 3.0]
    assert client._delay(0, "2") == 2.0
    assert client._delay(0, "3600") == 3.0


def _entry(platform: Platform, media_type: str = OCI_MANIFEST) -> Descriptor:
    return Descriptor(media_type, DIGEST, 1, platform=platform)


def test_select_platform() -> None:
    amd64, arm64, armv7 = (Platform("amd64", "linux"), Platform("arm64", "linux", "v8"),
                           Platform("arm", "linux", "v7"))
    entries = [_entry(amd64), _entry(arm64, DOCKER_MANIFEST), _entry(armv7)]
    assert select_platform(entries, Platform("arm64", "linux"), "x").platform == arm64
    assert select_platform(entries, Platform("arm", "linux", "v7"), "x").platform == armv7
    with pytest.raises(ImageError, match="available: linux/amd64, linux/arm/v7, linux/arm64/v8"):
        select_platform(entries, Platform("s390x", "linux"), "x")


def test_parse_platform() -> None:
    assert parse_platform("linux/arm64/v8") == Platform("arm64", "linux", "v8")
    assert parse_platform("linux/amd64") == Platform("amd64", "linux")
    for bad in ("linux", "linux/", "a/b/c/d"):
        with pytest.raises(UsageError):
            parse_platform(bad)


@pytest.mark.parametrize(("source", "target"), [
    ("https://r.example/v2/x/blobs/sha256:1", "https://cdn.example/b"),
    ("http://127.0.0.1:5000/v2/x/blobs/sha256:1", "http://localhost:5000/_blobstore/b"),
    ("http://127.0.0.1:5000/v2/x/blobs/sha256:1", "https://cdn.example/b")])
def test_redirects_keep_or_upgrade_the_scheme(source: str, target: str) -> None:
    assert _no_downgrade(source, target, "the redirect") == target


@pytest.mark.parametrize(("source", "target", "words"), [
    ("https://r.example/v2/", "http://cdn.example/b", "from https to plain http (cdn.example)"),
    ("https://r.example/v2/", "file:///etc/shadow", "only http and https"),
    ("http://127.0.0.1/v2/", "ftp://cdn.example/b", "only http and https")])
def test_downgrades_and_other_schemes_are_refused(source: str, target: str, words: str) -> None:
    with pytest.raises(RegistryError, match=re.escape(words)):
        _no_downgrade(source, target, "the redirect")
