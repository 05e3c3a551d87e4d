"""Shared fixtures: a throwaway state root with the demo image, and a CLI runner for e2e tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.registry import basic_registry, front, plain_registry, tls_registry  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parent.parent


def guest_built() -> str | None:
    """None when the guest artefacts exist, else the reason they don't."""
    from micropod.errors import MicropodError
    from micropod.guest.artefacts import locate

    try:
        locate()
    except MicropodError as exc:
        return str(exc)
    return None


def require_guest() -> None:
    reason = guest_built()
    if reason is None:
        return
    if os.environ.get("MICROPOD_REQUIRE_E2E"):
        pytest.fail(f"e2e required but the guest is not built: {reason}")
    pytest.skip(f"guest not built: {reason}")


@dataclass
class Cli:
    """micropod as a subprocess. Without ``netns`` its VMs get no NIC: tests never touch the machine's
    own network namespace; with it, micropod runs inside that (test-made) namespace."""

    root: Path
    netns: str | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["MICROPOD_ROOT"] = str(self.root)
        env.pop("MICROPOD_DEBUG", None)
        if self.netns is None:
            env["MICROPOD_NETWORK"] = "none"
        else:
            env.pop("MICROPOD_NETWORK", None)
        return env

    def argv(self, *args: str) -> list[str]:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [*prefix, sys.executable, "-m", "micropod", *args]

    def __call__(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), env=self.env(), capture_output=True, text=True, timeout=timeout)

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="session")
def hello_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from micropod.image.demo import build_demo_image

    return build_demo_image(tmp_path_factory.mktemp("demo") / "hello.oci.tar")


@pytest.fixture
def cli(tmp_path: Path, hello_archive: Path) -> Iterator[Cli]:
    """A CLI bound to a fresh state root holding the hello image; leftovers are killed afterwards."""
    require_guest()
    runner = Cli(tmp_path / "root")
    loaded = runner("load", "-i", str(hello_archive))
    assert loaded.returncode == 0, loaded.stderr
    yield runner
    ids = runner("ps", "-aq", "--no-trunc").stdout.split()
    if ids:
        runner("rm", "-f", *ids, timeout=120)
