"""Container ids and docker-style generated names."""

from __future__ import annotations

import re
import secrets

from micropod.errors import UsageError

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")

_ADJECTIVES = (
    "brave", "calm", "eager", "fond", "gentle", "happy", "jolly", "keen", "lucid", "merry",
    "nimble", "proud", "quiet", "rapid", "sharp", "tender", "upbeat", "vivid", "witty", "zen",
)
_NOUNS = (
    "babbage", "curie", "darwin", "euclid", "fermi", "gauss", "hopper", "kepler", "lovelace", "noether",
    "pascal", "ritchie", "shannon", "tesla", "turing", "wozniak", "yalow", "zuse", "hamilton", "knuth",
)


def new_vm_id() -> str:
    return secrets.token_hex(32)


def generated_name() -> str:
    return f"{secrets.choice(_ADJECTIVES)}_{secrets.choice(_NOUNS)}_{secrets.token_hex(2)}"


def check_name(name: str) -> str:
    """A container's name (docker's leading "/" allowed)."""
    return _checked(name.lstrip("/"), "container")


def check_pod_name(name: str) -> str:
    return _checked(name, "pod")


def _checked(name: str, kind: str) -> str:
    if not _NAME.match(name) or len(name) > 128:
        raise UsageError(f'invalid {kind} name "{name}": only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed')
    return name
