"""``cp`` between the host and a container, over a session's stdio and an exit report.

``archive-get`` sends a tar of the path as DATA on the session's stdout; ``archive-put`` takes the tar
as the session's stdin and unpacks it as it comes (never holding it whole in the guest's memory),
beneath an fd of the destination opened when the copy starts; its EOF ends the copy.
"""

from __future__ import annotations

import os

from micropod import wire
from micropod.agent import archive
from micropod.agent.errors import RequestError, describe

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol

    from micropod.agent.beneath import Untar
    from micropod.agent.containers import Container

    class CopyOwner(Protocol):
        """What file copies need of the agent (micropod/agent/main.py), which imports this module."""

        def container(self, message: dict[str, Any]) -> Container: ...
        def check_sid_free(self, sid: int) -> None: ...
        def send(self, frame: bytes) -> None: ...
        def send_control(self, message: dict[str, Any]) -> None: ...


class FileCopy:
    def __init__(self, agent: CopyOwner) -> None:
        self.agent = agent
        self.uploads: dict[int, tuple[Container, Untar]] = {}

    def on_archive_get(self, message: dict[str, Any]) -> dict[str, Any]:
        container = self.agent.container(message)
        sid = int(message["sid"])
        self.agent.check_sid_free(sid)
        stream = wire.stream_id(sid, wire.STDOUT)
        out = archive.FrameWriter(lambda data: self.agent.send(wire.encode(wire.DATA, stream, data)))
        try:
            archive.write_tar(container.root, str(message["path"]), out)
        except (archive.ArchiveError, OSError) as exc:
            raise RequestError(str(exc), 1) from None
        self.agent.send(wire.encode(wire.EOF, stream))
        self.agent.send_control({"op": wire.GuestOp.EXIT, "id": container.cid, "sid": sid, "code": 0})
        return {"size": out.written}

    def on_archive_put(self, message: dict[str, Any]) -> dict[str, Any]:
        container = self.agent.container(message)
        sid = int(message["sid"])
        self.agent.check_sid_free(sid)
        if sid in self.uploads:
            raise RequestError(f"session {sid} is in use")
        path = str(message["path"])
        try:
            real = archive.resolve(container.root, path)
        except archive.ArchiveError as exc:
            raise RequestError(str(exc), 1) from None
        if os.path.isdir(real):
            dest, rename = path, None
        else:
            parent = path.rstrip("/").rsplit("/", 1)[0] or "/"
            if path.endswith("/") or not os.path.isdir(archive.resolve(container.root, parent)):
                raise RequestError(f"Could not find the file {path} in container", 1)
            dest, rename = parent, path.rstrip("/").rsplit("/", 1)[-1]
        try:
            self.uploads[sid] = (container, archive.upload(container.root, dest, rename))
        except archive.ArchiveError as exc:
            raise RequestError(str(exc), 1) from None
        return {}

    def on_upload(self, sid: int, kind: int, payload: bytes) -> None:
        container, untar = self.uploads[sid]
        if kind != wire.EOF:
            untar.feed(payload)
            return
        del self.uploads[sid]
        code, error = 0, None
        try:
            archive.finish(untar)
        except Exception as exc:  # OSError too: the user hears what went wrong
            code, error = 1, describe(exc)
        report: dict[str, Any] = {"op": wire.GuestOp.EXIT, "id": container.cid, "sid": sid, "code": code}
        if error:
            report["message"] = error
        self.agent.send_control(report)
