"""Pulling from a real registry (Debian's docker-registry) in plain, basic-auth, TLS and token modes,
and every bad-input case: each gives one clear error line and leaves the store consistent."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from micropod import proc
from micropod.image.archive import LayoutWriter
from micropod.image.digest import sha256_digest
from micropod.image.model import OCI_CONFIG, OCI_INDEX, OCI_LAYER, Platform, canonical_json
from tests.conftest import Cli
from tests.imagetools import f, layer_tar
from tests.registry import PASSWORD, USER, Fault, Front, RunningRegistry, Tls, make_tls

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/docker-registry"), reason="docker-registry missing")


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("micropod: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def _check_clean(cli: Cli) -> None:
    result = cli("system", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not list((cli.root / "images" / "ingest").iterdir())


@pytest.fixture(scope="session")
def pushed(plain_registry: RunningRegistry, hello_archive: Path) -> str:
    plain_registry.push(f"oci-archive:{hello_archive}", "hello:latest")
    return f"{plain_registry.host}/hello:latest"


@pytest.fixture
def mp(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "root")


def _multiarch_layout(dest: Path, platforms: list[Platform]) -> None:
    writer = LayoutWriter()
    entries = []
    for platform in platforms:
        tar = layer_tar([f("etc/arch", platform.architecture)])
        from micropod.image.digest import sha256_digest

        config = {"architecture": platform.architecture, "os": platform.os,
                  **({"variant": platform.variant} if platform.variant else {}),
                  "config": {"Cmd": ["/bin/sh"]}, "rootfs": {"type": "layers", "diff_ids": [sha256_digest(tar)]}}
        manifest = writer.add_image(config, [(tar, OCI_LAYER)])
        writer.entries.clear()
        entries.append({**manifest.to_json(), "platform": platform.to_json()})
    index = writer.add_blob(canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}),
                            OCI_INDEX)
    writer.add_manifest(index, ["multi"])
    writer.write_dir(dest)


# -- the three registry modes -----------------------------------------------------------------------

def test_pull_plain_registry(mp: Cli, pushed: str) -> None:
    result = mp("pull", pushed)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == pushed
    assert "blobs downloaded" in result.stdout
    listed = [json.loads(line) for line in mp("images", "--format", "json").stdout.splitlines()]
    assert [(i["Repository"], i["Tag"]) for i in listed] == [(pushed.rsplit(":", 1)[0], "latest")]
    again = mp("pull", "-q", pushed)
    assert again.returncode == 0 and again.stdout.strip() == pushed
    _check_clean(mp)


def test_pull_basic_auth_needs_login(mp: Cli, basic_registry: RunningRegistry, hello_archive: Path) -> None:
    basic_registry.push(f"oci-archive:{hello_archive}", "hello:latest")
    ref = f"{basic_registry.host}/hello:latest"
    assert "authentication required" in _error_line(mp("pull", ref))
    bad = subprocess.run(mp.argv("login", "-u", USER, "--password-stdin", basic_registry.host), env=mp.env(),
                         input="wrong\n", capture_output=True, text=True, timeout=60)
    assert "401" in _error_line(bad)
    good = subprocess.run(mp.argv("login", "-u", USER, "--password-stdin", basic_registry.host), env=mp.env(),
                          input=PASSWORD + "\n", capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    auth_file = mp.root / "auth.json"
    assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600
    assert mp("pull", ref).returncode == 0
    assert mp("logout", basic_registry.host).returncode == 0
    assert basic_registry.host not in auth_file.read_text()
    _check_clean(mp)


def test_pull_uses_docker_config(mp: Cli, basic_registry: RunningRegistry, hello_archive: Path,
                                 tmp_path: Path) -> None:
    import base64

    basic_registry.push(f"oci-archive:{hello_archive}", "hello:latest")
    docker = tmp_path / "docker"
    docker.mkdir()
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (docker / "config.json").write_text(json.dumps({"auths": {f"http://{basic_registry.host}": {"auth": auth}}}))
    env = {**mp.env(), "DOCKER_CONFIG": str(docker)}
    result = subprocess.run(mp.argv("pull", f"{basic_registry.host}/hello:latest"), env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_pull_tls_registry(mp: Cli, tls_registry: RunningRegistry, hello_archive: Path) -> None:
    assert tls_registry.tls is not None
    tls_registry.push(f"oci-archive:{hello_archive}", "hello:latest")
    ref = f"{tls_registry.host}/hello:latest"
    assert "certificate" in _error_line(mp("pull", ref))
    trusted = subprocess.run(mp.argv("pull", ref), env={**mp.env(), "SSL_CERT_FILE": str(tls_registry.tls.ca)},
                             capture_output=True, text=True, timeout=60)
    assert trusted.returncode == 0, trusted.stderr
    assert mp("rmi", ref).returncode == 0
    assert mp("pull", "--tls-verify=false", ref).returncode == 0
    _check_clean(mp)


def test_pull_with_bearer_token_caches_per_scope(mp: Cli, front: Front, pushed: str) -> None:
    del pushed
    front.token_auth = True
    front.require_basic_for_token = False
    result = mp("pull", f"{front.host}/hello:latest")
    assert result.returncode == 0, result.stderr
    assert len(front.tokens_issued) == 1, front.tokens_issued
    assert "scope=repository%3Ahello%3Apull" in front.tokens_issued[0]
    assert "service=micropod-test" in front.tokens_issued[0]


def test_token_server_refusal_is_a_clear_error(mp: Cli, front: Front, pushed: str) -> None:
    del pushed
    front.token_auth = True
    front.require_basic_for_token = True
    assert "token server refused" in _error_line(mp("pull", f"{front.host}/hello:latest"))
    _check_clean(mp)


def test_redirects_never_carry_the_registry_token(mp: Cli, front: Front, pushed: str) -> None:
    del pushed
    front.token_auth = True
    front.faults.append(Fault("/blobs/", redirect=True))
    assert mp("pull", f"{front.host}/hello:latest").returncode == 0
    store_hits = [headers for _, path, headers in front.seen if path.startswith("/_blobstore/")]
    assert store_hits
    assert all("Authorization" not in h for h in store_hits)


# -- redirects keep or upgrade the scheme, never https -> http ------------------------------------------

@pytest.fixture(scope="session")
def front_certs(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("front-tls"))


@pytest.fixture
def tls_front(plain_registry: RunningRegistry, front_certs: Tls) -> Iterator[Front]:
    server = Front(plain_registry.host, tls=front_certs).start()
    yield server
    server.stop()


def _trusting(mp: Cli, tls: Tls, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mp.argv(*args), env={**mp.env(), "SSL_CERT_FILE": str(tls.ca)}, capture_output=True,
                          text=True, timeout=180)


def test_redirect_from_https_to_plain_http_is_refused(mp: Cli, tls_front: Front, front: Front, pushed: str) -> None:
    del pushed
    assert tls_front.tls is not None
    tls_front.faults.append(Fault("/blobs/", redirect=True, redirect_to=f"http://localhost:{front.port}"))
    error = _error_line(_trusting(mp, tls_front.tls, "pull", f"{tls_front.host}/hello:latest"))
    assert "from https to plain http" in error
    assert not [path for _, path, _ in front.seen if path.startswith("/_blobstore/")]
    _check_clean(mp)


def test_redirect_from_http_to_https_is_followed(mp: Cli, front: Front, tls_front: Front, pushed: str) -> None:
    del pushed
    assert tls_front.tls is not None
    front.faults.append(Fault("/blobs/", redirect=True, redirect_to=f"https://localhost:{tls_front.port}"))
    result = _trusting(mp, tls_front.tls, "pull", f"{front.host}/hello:latest")
    assert result.returncode == 0, result.stderr
    assert [path for _, path, _ in tls_front.seen if path.startswith("/_blobstore/")]


def test_token_realm_over_plain_http_is_refused_for_an_https_registry(mp: Cli, tls_front: Front, front: Front,
                                                                      pushed: str) -> None:
    del pushed
    assert tls_front.tls is not None
    tls_front.token_auth = True
    tls_front.realm = front.base  # the credentials would cross the network in clear
    error = _error_line(_trusting(mp, tls_front.tls, "pull", f"{tls_front.host}/hello:latest"))
    assert "token realm from https to plain http" in error
    assert not [path for _, path, _ in front.seen if path.startswith("/token")]
    tls_front.realm = None  # its own https realm is fine
    assert _trusting(mp, tls_front.tls, "pull", f"{tls_front.host}/hello:latest").returncode == 0
    assert tls_front.tokens_issued


# -- metadata read into memory is bounded ------------------------------------------------------------

def test_config_over_4_mib_is_refused_before_it_is_downloaded(mp: Cli, plain_registry: RunningRegistry) -> None:
    tar = layer_tar([f("etc/big", "1")])
    config = canonical_json({"architecture": "amd64", "os": "linux", "config": {"Labels": {"x": "y" * (5 << 20)}},
                             "rootfs": {"type": "layers", "diff_ids": [sha256_digest(tar)]}})
    plain_registry.put_raw("bigconfig", "v1", [(config, OCI_CONFIG), (tar, OCI_LAYER)])
    error = _error_line(mp("pull", f"{plain_registry.host}/bigconfig:v1"))
    assert re.search(r"config sha256:[0-9a-f]{64} declares \d+ bytes, more than the 4 MiB allowed", error), error
    _check_clean(mp)
    assert mp("images", "-q").stdout.strip() == ""


def test_platform_selection(mp: Cli, plain_registry: RunningRegistry, tmp_path: Path) -> None:
    layout = tmp_path / "multi"
    _multiarch_layout(layout, [Platform("amd64", "linux"), Platform("arm64", "linux", "v8")])
    plain_registry.push(f"oci:{layout}:multi", "multi:latest", extra=("--all",))
    ref = f"{plain_registry.host}/multi:latest"
    assert mp("pull", "--platform", "linux/arm64", ref).returncode == 0
    inspect = json.loads(mp("inspect", "--type", "image", ref).stdout)
    assert inspect[0]["Architecture"] == "arm64"
    error = _error_line(mp("pull", "--platform", "linux/s390x", ref))
    assert "linux/amd64" in error and "linux/arm64/v8" in error
    _check_clean(mp)


# -- bad input --------------------------------------------------------------------------------------

def test_digest_mismatch_stores_nothing(mp: Cli, front: Front, pushed: str) -> None:
    del pushed
    front.faults.append(Fault("/blobs/", corrupt=True))
    error = _error_line(mp("pull", f"{front.host}/hello:latest"))
    assert "does not match its digest" in error and "sha256:" in error
    blobs = list((mp.root / "images" / "blobs" / "sha256").iterdir())
    assert all(proc.run(["sha256sum", b]).stdout.split()[0].decode() == b.name for b in blobs)
    assert mp("images", "-q").stdout == ""
    _check_clean(mp)


def test_truncated_download(mp: Cli, front: Front, pushed: str) -> None:
    del pushed
    front.faults.append(Fault("/blobs/", truncate=True))
    error = _error_line(mp("pull", f"{front.host}/hello:latest"))
    assert "blob sha256:" in error
    _check_clean(mp)


def test_unknown_manifest_media_type(mp: Cli, front: Front, pushed: str) -> None:
    del pushed
    front.faults.append(Fault("/manifests/", content_type="application/vnd.example.unknown+json"))
    assert "unsupported manifest media type 'application/vnd.example.unknown+json'" in _error_line(
        mp("pull", f"{front.host}/hello:latest"))
    _check_clean(mp)


@pytest.mark.parametrize(("status", "words"), [(403, "denied (HTTP 403)"), (500, "HTTP 500"),
                                                (429, "HTTP 429"), (503, "HTTP 503")])
def test_http_errors(mp: Cli, front: Front, pushed: str, status: int, words: str) -> None:
    del pushed
    front.faults.append(Fault("/manifests/", status=status))
    assert words in _error_line(mp("pull", f"{front.host}/hello:latest"))
    _check_clean(mp)


def test_429_is_retried_then_succeeds(mp: Cli, front: Front, pushed: str) -> None:
    del pushed
    front.faults.append(Fault("/blobs/", status=429, times=2, retry_after="0"))
    front.faults.append(Fault("/manifests/", status=502, times=1))
    assert mp("pull", f"{front.host}/hello:latest").returncode == 0
    _check_clean(mp)


def test_404_names_the_image(mp: Cli, pushed: str) -> None:
    host = pushed.split("/")[0]
    assert "not found (HTTP 404)" in _error_line(mp("pull", f"{host}/nosuch:latest"))


def test_401_without_credentials(mp: Cli, basic_registry: RunningRegistry) -> None:
    assert "authentication required" in _error_line(mp("pull", f"{basic_registry.host}/hello:latest"))


def test_dns_failure(mp: Cli) -> None:
    assert "cannot resolve" in _error_line(mp("pull", "nonexistent.invalid/foo:latest"))


def test_interrupted_pull_then_rerun_completes(mp: Cli, front: Front, pushed: str) -> None:
    del pushed
    front.faults.append(Fault("/blobs/", status=500))
    _error_line(mp("pull", f"{front.host}/hello:latest"))
    _check_clean(mp)
    front.faults.clear()
    assert mp("pull", f"{front.host}/hello:latest").returncode == 0
    _check_clean(mp)


def test_concurrent_pulls_are_safe(mp: Cli, pushed: str) -> None:
    children = [mp.spawn("pull", "-q", pushed) for _ in range(3)]
    outputs = [c.communicate(timeout=120) for c in children]
    assert all(c.returncode == 0 for c in children), outputs
    assert len(mp("images", "-q").stdout.split()) == 1
    _check_clean(mp)


def test_full_disk_while_writing_a_blob(tmp_path: Path, pushed: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    root = tmp_path / "tiny"
    root.mkdir()
    proc.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", root])
    try:
        mp = Cli(root)
        error = _error_line(mp("pull", pushed))
        assert "No space left on device" in error
        _check_clean(mp)
    finally:
        proc.run(["umount", root])


# -- store commands ---------------------------------------------------------------------------------

def test_store_commands(mp: Cli, pushed: str, tmp_path: Path) -> None:
    assert mp("pull", "-q", pushed).returncode == 0
    assert mp("tag", pushed, "localhost/copy:1").returncode == 0
    assert "localhost/copy" in mp("images").stdout
    archive = tmp_path / "saved.tar"
    assert mp("save", "-o", str(archive), "localhost/copy:1").returncode == 0
    other = Cli(tmp_path / "other")
    loaded = other("load", "-i", str(archive))
    assert loaded.returncode == 0 and "localhost/copy:1" in loaded.stdout
    assert mp("rmi", pushed, "localhost/copy:1").returncode == 0
    pruned = mp("image", "prune")
    assert pruned.returncode == 0 and "Deleted 0" in pruned.stdout  # rmi collected the blobs already
    assert not list((mp.root / "images" / "blobs" / "sha256").iterdir())
    _check_clean(mp)


def test_system_check_reports_a_corrupt_blob(mp: Cli, pushed: str) -> None:
    assert mp("pull", "-q", pushed).returncode == 0
    blob = max((mp.root / "images" / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    result = mp("system", "check")
    assert result.returncode != 0
    assert f"corrupt blob sha256:{blob.name}" in result.stdout


def test_image_unpack_builds_the_squashfs_and_the_tree(mp: Cli, pushed: str, tmp_path: Path) -> None:
    assert mp("pull", "-q", pushed).returncode == 0
    built = mp("image", "unpack", pushed)
    assert built.returncode == 0, built.stderr
    assert Path(built.stdout.strip()).is_file()
    tree = tmp_path / "tree"
    unpacked = mp("image", "unpack", pushed, "--to", str(tree))
    assert unpacked.returncode == 0, unpacked.stderr
    assert (tree / "bin" / "busybox").is_file()


# -- end to end -------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_run_pulls_a_missing_image_and_runs_it(mp: Cli, pushed: str) -> None:
    from tests.conftest import require_guest

    require_guest()
    result = mp("run", "--rm", pushed, "echo", "pulled-and-ran", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "pulled-and-ran" in result.stdout
    assert "was not in the store: pulled" in result.stderr
    again = mp("run", "--rm", pushed, "true", timeout=300)
    assert again.returncode == 0 and "pulled" not in again.stderr


def test_image_prune_removes_dangling_images(mp: Cli, plain_registry: RunningRegistry, pushed: str,
                                             tmp_path: Path) -> None:
    from tests.imagetools import compress, oci_layout

    layout = tmp_path / "other"
    oci_layout(layout, [compress(layer_tar([f("other", "other")]), "gzip")], ref="o")
    plain_registry.push(f"oci:{layout}:o", "other:latest")
    other = f"{plain_registry.host}/other:latest"
    assert mp("pull", "-q", pushed).returncode == 0
    assert mp("pull", "-q", other).returncode == 0
    assert mp("tag", other, pushed).returncode == 0  # the hello image keeps no name: dangling
    listed = [json.loads(line) for line in mp("images", "--format", "json").stdout.splitlines()]
    assert sorted(i["Tag"] for i in listed) == ["<none>", "latest", "latest"]
    pruned = mp("image", "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert "Deleted: sha256:" in pruned.stdout
    assert len(mp("images", "-q").stdout.split()) == 1
    _check_clean(mp)
