"""What a VM's metadata service serves, as one JSON tree, and how a GET path reads it.

The same tree goes to Firecracker's MMDS (``PUT /mmds``) and to micropod's own server on QEMU, which reads
it as MMDS does: a path names a node; an object is listed one key per line (objects with a trailing ``/``), a
string is sent as it is, and ``Accept: application/json`` gets the node as JSON.

The user's data (``--metadata KEY=VALUE``, ``--metadata-file F``) is a JSON object under ``user-data``, bounded
in size and depth, with keys that can be named in a path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from micropod.errors import UsageError
from micropod.jsonfile import read_json_object

ADDRESS = "169.254.169.254"
PORT = 80
MAX_USER_DATA = 32 << 10  # Firecracker's data store takes 51200 bytes by default; the rest is ours
MAX_DEPTH = 16
MAX_KEY = 255
Tree = dict[str, Any]


@dataclass(frozen=True)
class Identity:
    instance_id: str
    name: str
    image: str
    image_digest: str
    local_ipv4: str
    hostname: str
    labels: dict[str, str]

    def document(self) -> dict[str, Any]:
        return {"instanceId": self.instance_id, "name": self.name, "image": self.image,
                "imageDigest": self.image_digest, "privateIp": self.local_ipv4, "hostname": self.hostname,
                "labels": dict(self.labels)}


def build(identity: Identity, user_data: Tree, jwt: str = "") -> Tree:
    return {"latest": {
        "meta-data": {"instance-id": identity.instance_id, "local-ipv4": identity.local_ipv4,
                      "hostname": identity.hostname},
        "dynamic": {"instance-identity": {"document": json.dumps(identity.document(), sort_keys=True)}},
        "user-data": user_data,
        "credentials": {"jwt": jwt},
    }}


def lookup(tree: Tree, path: str) -> Any:
    """The node at ``path`` ("/latest/meta-data/"), or KeyError."""
    node: Any = tree
    for part in (p for p in path.split("/") if p):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def render(node: Any, as_json: bool) -> tuple[bytes, str]:
    """The body and its content type."""
    if as_json:
        return json.dumps(node, sort_keys=True).encode(), "application/json"
    if isinstance(node, dict):
        listing = "\n".join(f"{key}/" if isinstance(value, dict) else key for key, value in node.items())
        return listing.encode(), "text/plain"
    if isinstance(node, str):
        return node.encode(), "text/plain"
    return json.dumps(node).encode(), "text/plain"


def _check(node: Any, where: str, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise UsageError(f"invalid metadata: {where} nests deeper than {MAX_DEPTH} levels")
    if isinstance(node, dict):
        for key, value in node.items():
            if not key or len(key) > MAX_KEY or "/" in key or not key.isprintable():
                raise UsageError(f"invalid metadata key {key[:40]!r} in {where}: 1 to {MAX_KEY} printable "
                                 "characters without '/'")
            _check(value, f"{where}.{key}", depth + 1)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _check(value, f"{where}[{index}]", depth + 1)


def user_data(pairs: tuple[str, ...], file: str | None) -> Tree:
    """``--metadata-file`` (a JSON object) with each ``--metadata KEY=VALUE`` over it."""
    data: Tree = {}
    if file is not None:
        data = read_json_object(Path(file), MAX_USER_DATA, f"--metadata-file {file}") or {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"invalid --metadata {pair[:40]!r}: use KEY=VALUE")
        data[key] = value
    _check(data, "user-data")
    if len(json.dumps(data)) > MAX_USER_DATA:
        raise UsageError(f"the metadata is over {MAX_USER_DATA >> 10} KiB")
    return data
