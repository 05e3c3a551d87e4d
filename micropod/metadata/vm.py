"""One VM's metadata service, as its monitor runs it: the tree, the credentials (minted again well before they
expire), and on QEMU the server; on Firecracker the tree goes to MMDS, whose credential the monitor renews
with ``PATCH /mmds``."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from micropod.errors import MicropodError
from micropod.metadata import credential, tree
from micropod.metadata.server import Handler, MetadataServer, SessionTokens
from micropod.paths import StateRoot

log = logging.getLogger("micropod.monitor")

MAX_AUDIENCES = 16  # credentials kept for reuse; a guest asking for more audiences gets them minted afresh
IP_FREEBIND = 15


class VmMetadata:
    def __init__(self, root: StateRoot, identity: tree.Identity, user_data: tree.Tree,
                 clock: Callable[[], float] | None = None) -> None:
        self.identity = identity
        self.user_data = user_data
        self.subject = credential.Subject(identity.instance_id, identity.name, identity.image, identity.image_digest)
        self.issuer = credential.Issuer(root, clock)
        self.audience = credential.default_audience()
        self.lifetime = credential.lifetime()
        self._clock = clock or (lambda: time.time())
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[str, int]] = {}
        self._server: MetadataServer | None = None
        self._renewal: threading.Event | None = None

    def credential(self, audience: str = "") -> str:
        """A valid credential for ``audience`` (the default if empty), reused until a third of its life is left."""
        audience = credential.check_audience(audience or self.audience)
        with self._lock:
            cached = self._cache.get(audience)
            if cached is not None and cached[1] - self._clock() > self.lifetime / 3:
                return cached[0]
            token, expiry = self.issuer.mint(self.subject, audience, self.lifetime)
            if audience not in self._cache and len(self._cache) >= MAX_AUDIENCES:
                self._cache.pop(next(iter(self._cache)))
            self._cache[audience] = (token, expiry)
            return token

    def tree(self) -> tree.Tree:
        return tree.build(self.identity, self.user_data, self.credential())

    # -- QEMU: micropod's own server on the gateway ----------------------------------------------------

    def open_listener(self, gateway: str) -> int:
        """Bind the server's socket before the bridge may exist (its rules need the port); the port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            listener.bind((gateway, 0))
        except OSError:
            listener.close()
            raise
        self._server = MetadataServer(listener, Handler(self.tree, self.credential, SessionTokens()),
                                      self.identity.local_ipv4)
        return self._server.port

    def serve(self, bridge: str) -> None:
        """Listen, bound to the bridge (the firewall's input rule is what keeps the host's own users out)."""
        assert self._server is not None
        self._server.listener.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, bridge.encode())
        self._server.start()

    # -- Firecracker: MMDS, renewed ---------------------------------------------------------------------

    def renew_into(self, patch: Callable[[dict[str, Any]], None]) -> None:
        """Every third of a credential's life, MMDS gets a fresh one, until close() or the next boot's call."""
        if self._renewal is not None:
            self._renewal.set()
        stop = self._renewal = threading.Event()

        def renew() -> None:
            while not stop.wait(self.lifetime / 3):
                try:
                    patch({"latest": {"credentials": {"jwt": self.credential()}}})
                except MicropodError as exc:
                    log.warning("renewing the VM's credential in MMDS failed: %s", exc)

        threading.Thread(target=renew, name="mmds-renewal", daemon=True).start()

    def close(self) -> None:
        if self._renewal is not None:
            self._renewal.set()
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.close()
            self._server = None
