"""Versioned JSON records kept beside state.db (a VM's config.json).

Each record carries its kind's schema version. An older one is upgraded as it is read, one step per version;
a newer one is refused. A record that is there but cannot be understood is an error naming the file and what
is wrong, never a record that silently vanishes: a caller treating it as absent would, for one, let
``system prune`` delete the base image of a VM that still uses it. Records are written atomically, so a crash
leaves the old or the new one, never half of either.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from micropod.errors import StateError
from micropod.jsonfile import read_json_object

VERSION_KEY = "schema"
MAX_RECORD = 4 << 20

Upgrade = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class RecordKind:
    """``upgrades[n]`` turns a version-n record into version n+1; records from before versioning are 0."""

    name: str
    upgrades: tuple[Upgrade, ...]

    @property
    def version(self) -> int:
        return len(self.upgrades)


def encode(kind: RecordKind, data: dict[str, Any]) -> bytes:
    return json.dumps({VERSION_KEY: kind.version, **data}, indent=1).encode()


def decode(kind: RecordKind, path: Path) -> dict[str, Any] | None:
    """The record at its current version; None only if there is no such file."""
    raw = read_json_object(path, MAX_RECORD, f"{path}: the {kind.name}", StateError, missing_ok=True)
    if raw is None:
        return None
    record: dict[str, Any] = raw
    version = record.pop(VERSION_KEY, 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise StateError(f"{path}: the {kind.name} has a bad {VERSION_KEY!r}: {version!r}")
    if version > kind.version:
        raise StateError(f"{path}: the {kind.name} is at version {version}, newer than this micropod knows "
                         f"({kind.version}); use the micropod that wrote it, or a newer one")
    for upgrade in kind.upgrades[version:]:
        record = upgrade(record)
    return record


def not_understood(kind: RecordKind, path: Path, exc: Exception) -> StateError:
    """For a record whose fields do not fit this micropod's (renamed, missing, of the wrong type)."""
    detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
    return StateError(f"{path}: the {kind.name} does not fit this micropod: {detail}")
