"""A CRI client for the tests: `micropod cri serve` as a subprocess, driven over its Unix socket with the stubs
that grpcio-tools generated from the vendored proto (never the server's own code)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from micropod.cri.gen import api_pb2 as pb
from micropod.cri.gen import api_pb2_grpc as rpc

__all__ = ["CriServer", "pb", "rpc"]


@dataclass
class CriServer:
    root: Path
    socket: Path
    log: Path
    extra: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    wrapper: tuple[str, ...] = ()  # argv the server runs under, e.g. ip netns exec NS (its VMs then have a network)
    child: subprocess.Popen[bytes] | None = None
    channel: grpc.Channel | None = None

    @classmethod
    def over_loaded_root(cls, tmp_path: Path, archive: Path, **fields: Any) -> CriServer:
        """A started server over a new root under ``tmp_path`` into which ``archive`` (an image) was loaded."""
        from tests.conftest import Cli

        root = tmp_path / "root"
        loaded = Cli(root)("load", "-i", str(archive))
        assert loaded.returncode == 0, loaded.stderr
        return cls(root, tmp_path / "run" / "cri.sock", tmp_path / "cri.log", **fields).start()

    def start(self, timeout: float = 30.0) -> CriServer:
        env = {**os.environ, "MICROPOD_ROOT": str(self.root), "MICROPOD_NETWORK": "none", **self.env}
        env.pop("MICROPOD_DEBUG", None)
        if self.wrapper and "MICROPOD_NETWORK" not in self.env:
            del env["MICROPOD_NETWORK"]  # in a test's own namespace micropod's default network, the bridge, is safe
        # hermetic: no CNI configuration unless a test gives one (the host's /etc/cni/net.d is not the test's)
        no_cni = () if "--cni-conf-dir" in self.extra else ("--cni-conf-dir", str(self.socket.parent / "no-cni"))
        argv = [*self.wrapper, sys.executable, "-m", "micropod", "--debug", "cri", "serve",
                "--listen", f"unix://{self.socket}", "--log-file", str(self.log), *no_cni, *self.extra]
        self.child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.child.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the CRI server did not listen:\n{self.log_tail()}")
            time.sleep(0.02)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        return self

    @property
    def runtime(self) -> rpc.RuntimeServiceStub:
        assert self.channel is not None
        return rpc.RuntimeServiceStub(self.channel)

    @property
    def images(self) -> rpc.ImageServiceStub:
        assert self.channel is not None
        return rpc.ImageServiceStub(self.channel)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(sig)
            try:
                self.child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait(timeout=10)


def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    """The status of a call expected to fail: (code, details)."""
    assert callable(call)
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    raise AssertionError("the call succeeded")
