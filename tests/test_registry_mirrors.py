"""Registry mirrors (registries.json `mirrors`, as containerd's): real docker-registry instances as the
registry and its mirrors, a Front before them to see the requests and to break or falsify answers.
Each mirror is tried in order, then the registry; a failing one falls through; the image keeps its own
name; a mirror's content is checked as the registry's is; a bad settings file is one clear line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from micropod.context import Context
from micropod.cri.api import pb
from micropod.cri.images import Images
from micropod.errors import UsageError
from micropod.image.credentials import insecure_registries
from micropod.image.digest import sha256_digest
from micropod.image.model import OCI_CONFIG, OCI_LAYER
from micropod.image.pull import host_platform
from micropod.image.settings import RegistrySettings, registry_settings
from micropod.image.store import ImageStore
from micropod.paths import StateRoot
from tests.conftest import Cli
from tests.imagetools import f, layer_tar
from tests.registry import PASSWORD, USER, Fault, Front, RunningRegistry, free_port, start_registry

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/docker-registry"), reason="docker-registry missing")


def _image(marker: str) -> list[tuple[bytes, str]]:
    """A small image whose one file says `marker`: (config, layer), for RunningRegistry.put_raw."""
    tar = layer_tar([f("etc/marker", marker)])
    platform = host_platform()
    config = {"architecture": platform.architecture, "os": platform.os, "config": {"Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": [sha256_digest(tar)]}}
    return [(json.dumps(config).encode(), OCI_CONFIG), (tar, OCI_LAYER)]


def _digest(manifest: bytes) -> str:
    return sha256_digest(manifest)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """The registry itself, holding hello:latest ("upstream")."""
    registry = start_registry(tmp_path_factory.mktemp("upstream"))
    registry.put_raw("hello", "latest", _image("upstream"))
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """A mirror holding hello:latest ("mirror"), the upstream's hello too (same bytes, same digest), and
    Docker Hub's library/busybox:latest."""
    registry = start_registry(tmp_path_factory.mktemp("mirror"))
    registry.put_raw("hello", "latest", _image("mirror"))
    registry.put_raw("hello", "upstream", _image("upstream"))
    registry.put_raw("library/busybox", "latest", _image("busybox from the mirror"))
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def empty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    registry = start_registry(tmp_path_factory.mktemp("empty"))
    yield registry
    registry.stop()


@pytest.fixture
def mp(tmp_path: Path) -> Cli:
    cli = Cli(tmp_path / "root")
    cli.root.mkdir()
    return cli


@pytest.fixture
def fronts() -> Iterator[list[Front]]:
    started: list[Front] = []
    yield started
    for front in started:
        front.stop()


def _front(fronts: list[Front], registry: RunningRegistry, **kw: object) -> Front:
    front = Front(registry.host, **kw).start()  # type: ignore[arg-type]
    fronts.append(front)
    return front


def _settings(mp: Cli, mirrors: dict[str, list[str]], **more: object) -> None:
    (mp.root / "registries.json").write_text(json.dumps({"mirrors": mirrors, **more}))


def _dead() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens: connection refused


def _marker(mp: Cli, ref: str) -> str:
    """What etc/marker says in the stored image `ref`; the store's refs must hold `ref` as given."""
    store = ImageStore(mp.root / "images")
    image = store.resolve(ref)
    assert ref in image.refs, image.refs
    layer = store.read_manifest(image.manifest_digest).layers[0]
    with tarfile.open(fileobj=io.BytesIO(store.read_blob(layer.digest))) as tar:
        member = tar.extractfile("etc/marker")
        assert member is not None
        return member.read().decode()


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout
    assert len(lines) == 1 and lines[0].startswith("micropod: error: "), result.stderr
    return lines[0]


def _pulled(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr


def _manifest_gets(front: Front) -> list[str]:
    return [path for method, path, _ in front.seen if method == "GET" and "/manifests/" in path]


# -- the mirror first, the registry last --------------------------------------------------------------

def test_a_mirror_with_the_image_is_used_first(mp: Cli, mirror: RunningRegistry, fronts: list[Front]) -> None:
    front = _front(fronts, mirror)
    registry = _dead()  # the registry itself is down: only the mirror can serve this
    _settings(mp, {registry: [front.base]})
    _pulled(mp("pull", f"{registry}/hello:latest"))
    assert _manifest_gets(front) == ["/v2/hello/manifests/latest"]
    assert _marker(mp, f"{registry}/hello:latest") == "mirror"  # under its own name, never the mirror's
    listed = [json.loads(line) for line in mp("images", "--format", "json").stdout.splitlines()]
    assert [(i["Repository"], i["Tag"]) for i in listed] == [(f"{registry}/hello", "latest")]


def test_a_docker_hub_mirror_keeps_the_hub_name(mp: Cli, mirror: RunningRegistry, fronts: list[Front]) -> None:
    front = _front(fronts, mirror)
    _settings(mp, {"docker.io": [front.base]})
    _pulled(mp("pull", "busybox"))
    assert _manifest_gets(front) == ["/v2/library/busybox/manifests/latest"]
    assert _marker(mp, "docker.io/library/busybox:latest") == "busybox from the mirror"


def test_mirrors_in_order_then_the_registry(mp: Cli, upstream: RunningRegistry, empty: RunningRegistry,
                                            mirror: RunningRegistry, fronts: list[Front]) -> None:
    """A dead mirror, then one without the image (404), then one under a path prefix (written with a
    trailing /v2/) that has it: the third serves, the registry (with other bytes) is never asked."""
    lacking, prefixed = _front(fronts, empty), _front(fronts, mirror, prefix="/cache")
    registry = _front(fronts, upstream)
    _settings(mp, {registry.host: [f"http://{_dead()}", lacking.base, f"{prefixed.base}/cache/v2/"]})
    _pulled(mp("pull", f"{registry.host}/hello:latest"))
    assert _manifest_gets(lacking) == ["/v2/hello/manifests/latest"]
    assert _manifest_gets(prefixed) == ["/cache/v2/hello/manifests/latest"]
    assert registry.seen == []
    assert _marker(mp, f"{registry.host}/hello:latest") == "mirror"


@pytest.mark.parametrize("broken", ["dead", "empty", "5xx", "auth"])
def test_a_broken_mirror_falls_through_to_the_registry(broken: str, mp: Cli, upstream: RunningRegistry,
                                                       empty: RunningRegistry, mirror: RunningRegistry,
                                                       basic_registry: RunningRegistry,
                                                       fronts: list[Front]) -> None:
    if broken == "dead":
        url = f"http://{_dead()}"
    elif broken == "empty":
        url = _front(fronts, empty).base
    elif broken == "5xx":
        url = _front(fronts, mirror, faults=[Fault("/manifests/", status=503)]).base
    else:
        url = f"http://{basic_registry.host}"  # wants a login the credential store does not have
    _settings(mp, {upstream.host: [url]})
    _pulled(mp("pull", f"{upstream.host}/hello:latest"))
    assert _marker(mp, f"{upstream.host}/hello:latest") == "upstream"


def test_when_every_endpoint_fails_the_registry_error_is_shown(mp: Cli, empty: RunningRegistry,
                                                               fronts: list[Front]) -> None:
    lacking = _front(fronts, empty)
    registry = _dead()
    _settings(mp, {registry: [lacking.base]})
    line = _error_line(mp("pull", f"{registry}/hello:latest"))
    assert line.startswith(f"micropod: error: {registry}: GET /v2/: ") and "Connection refused" in line, line
    assert f"mirror {lacking.base}: manifest hello:latest not found (HTTP 404)" in line, line
    assert mp("images", "-q").stdout.strip() == ""


def test_mirror_credentials_come_from_the_store_by_the_mirror_host(mp: Cli, basic_registry: RunningRegistry,
                                                                  hello_archive: Path) -> None:
    basic_registry.push(f"oci-archive:{hello_archive}", "hello:latest")
    registry = _dead()
    _settings(mp, {registry: [f"http://{basic_registry.host}"]})
    assert "authentication required" in _error_line(mp("pull", f"{registry}/hello:latest"))
    login = subprocess.run(mp.argv("login", "-u", USER, "--password-stdin", basic_registry.host), env=mp.env(),
                           input=PASSWORD + "\n", capture_output=True, text=True, timeout=60)
    assert login.returncode == 0, login.stderr
    _pulled(mp("pull", f"{registry}/hello:latest"))


# -- a mirror is untrusted ----------------------------------------------------------------------------

def test_a_mirror_lying_about_a_pinned_digest_is_refused(mp: Cli, upstream: RunningRegistry,
                                                         mirror: RunningRegistry, fronts: list[Front]) -> None:
    """The mirror answers the pinned digest with another (valid) manifest and a Docker-Content-Digest
    to match it: refused, never stored; the registry serves the real one."""
    pinned = _digest(upstream.put_raw("hello", "latest", _image("upstream")))
    other = mirror.put_raw("hello", "latest", _image("mirror"))
    liar = _front(fronts, mirror, faults=[Fault(f"/manifests/{pinned}", body=other)])
    registry = _front(fronts, upstream)
    _settings(mp, {registry.host: [liar.base]})
    _pulled(mp("pull", f"{registry.host}/hello@{pinned}"))
    assert _manifest_gets(liar) == [f"/v2/hello/manifests/{pinned}"]
    store = ImageStore(mp.root / "images")
    assert [image.manifest_digest for image in store.list()] == [pinned]
    assert not store.has_blob(_digest(other))
    registry.stop()  # now only the liar answers: the pull fails, and says why the mirror was refused
    fresh = Cli(mp.root.parent / "fresh")
    fresh.root.mkdir()
    _settings(fresh, {registry.host: [liar.base]})
    line = _error_line(fresh("pull", f"{registry.host}/hello@{pinned}"))
    assert f"does not match its digest {pinned}" in line and "Connection refused" in line, line


@pytest.mark.parametrize("fault", ["missing", "corrupt"])
def test_blobs_a_mirror_cannot_give_come_from_the_registry(fault: str, mp: Cli, upstream: RunningRegistry,
                                                           mirror: RunningRegistry, fronts: list[Front]) -> None:
    """The mirror serves the manifest but not good blobs (404, or bytes that fail their digest)."""
    broken = Fault("/blobs/", status=404) if fault == "missing" else Fault("/blobs/", corrupt=True)
    front = _front(fronts, mirror, faults=[broken])
    _settings(mp, {upstream.host: [front.base]})
    _pulled(mp("pull", f"{upstream.host}/hello:upstream"))
    assert _manifest_gets(front) == ["/v2/hello/manifests/upstream"]
    assert any("/blobs/" in path for _, path, _ in front.seen)
    assert _marker(mp, f"{upstream.host}/hello:upstream") == "upstream"
    result = subprocess.run(mp.argv("system", "check"), env=mp.env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_corrupt_blob_from_a_mirror_alone_fails_the_pull(mp: Cli, mirror: RunningRegistry,
                                                           fronts: list[Front]) -> None:
    front = _front(fronts, mirror, faults=[Fault("/blobs/", corrupt=True)])
    registry = _dead()
    _settings(mp, {registry: [front.base]})
    line = _error_line(mp("pull", f"{registry}/hello:latest"))
    assert "does not match" in line or "digest" in line, line
    assert not list((mp.root / "images" / "ingest").iterdir())


# -- every entry point --------------------------------------------------------------------------------

def test_cri_pull_image_goes_through_the_mirrors(mp: Cli, mirror: RunningRegistry, fronts: list[Front]) -> None:
    front = _front(fronts, mirror)
    registry = _dead()
    _settings(mp, {registry: [front.base]})
    ctx = Context(StateRoot(mp.root))
    pulled = Images().PullImage(ctx, pb.PullImageRequest(image=pb.ImageSpec(image=f"{registry}/hello:latest")))
    assert _manifest_gets(front) == ["/v2/hello/manifests/latest"]
    assert pulled.image_ref == ctx.images.resolve(f"{registry}/hello:latest").config_digest


# -- the settings file --------------------------------------------------------------------------------

BAD_SETTINGS = [
    ("[]", "must be a JSON object"),
    ('{"mirror": {}}', "unknown field 'mirror'"),
    ('{"insecure": "r.example"}', "'insecure' must be a list of registry hosts"),
    ('{"mirrors": ["http://m.example"]}', "'mirrors' must be an object"),
    ('{"mirrors": {"docker.io": "http://m.example"}}', 'mirrors["docker.io"]: must be a list of mirror URLs'),
    ('{"mirrors": {"docker.io": [5000]}}', 'mirrors["docker.io"][0]: must be a URL string, not int'),
    ('{"mirrors": {"docker.io": ["http://ok.example", "ftp://m.example"]}}',
     'mirrors["docker.io"][1]: mirror URL \'ftp://m.example\' must start with http:// or https://'),
    ('{"mirrors": {"docker.io": ["m.example:5000"]}}', "must start with http:// or https://"),
    ('{"mirrors": {"docker.io": ["http:///v2"]}}', "has no host"),
    ('{"mirrors": {"docker.io": ["http://m.example:99999"]}}', "invalid mirror URL"),
    ('{"mirrors": {"docker.io": ["https://u:p@m.example"]}}', "must not carry credentials"),
    ('{"mirrors": {"docker.io": ["https://m.example/?x=1"]}}', "must not have a query"),
    ('{"mirrors": {"https://docker.io": []}}', "is not a registry host"),
    ('{"mirrors": {"docker.io": [], "index.docker.io": []}}', "listed twice"),
    ("{not json", "cannot read registry settings"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_SETTINGS, ids=[e for _, e in BAD_SETTINGS])
def test_bad_settings_are_one_line_naming_the_file_and_field(mp: Cli, text: str, expected: str) -> None:
    path = mp.root / "registries.json"
    path.write_text(text)
    line = _error_line(mp("pull", "127.0.0.1:1/hello:latest"))
    assert str(path) in line and expected in line, line
    with pytest.raises(UsageError, match=r"registries\.json"):
        registry_settings(path)


def test_settings_normalise_and_keep_insecure_optional(tmp_path: Path) -> None:
    path = tmp_path / "registries.json"
    assert registry_settings(path) == RegistrySettings()
    path.write_text(json.dumps({"insecure": ["m.example:5000"],
                                "mirrors": {"Index.Docker.IO": ["HTTP://M.example:5000/v2/", "https://n.example/p/"],
                                            "r.example:5000": []}}))
    settings = registry_settings(path)
    assert settings.mirrors == {"docker.io": ("http://m.example:5000", "https://n.example/p"), "r.example:5000": ()}
    path.write_text(json.dumps({"mirrors": {"docker.io": ["http://127.0.0.1:5000", "http://localhost:1"]}}))
    assert len(registry_settings(path).mirrors["docker.io"]) == 2  # plain HTTP to this machine needs no listing
    path.write_text(json.dumps({"mirrors": {"docker.io": ["http://m.example:5000"]}}))
    with pytest.raises(UsageError, match=r"is plain HTTP: list m\.example:5000 in 'insecure'"):
        registry_settings(path)
    path.write_text(json.dumps({"mirrors": {"docker.io": ["https://n.example"]}}))
    assert insecure_registries(path) == frozenset()  # a file with mirrors alone is no error for `insecure`
    path.write_text(json.dumps({"insecure": ["r.example:5000"], "mirrors": {}}))
    assert insecure_registries(path) == {"r.example:5000"}
