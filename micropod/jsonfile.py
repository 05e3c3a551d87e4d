"""Reading a JSON object from a file someone else wrote (a user's option, a record): bounded, and each way it
can be wrong one clear line of the caller's error class."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from micropod.errors import MicropodError, UsageError


def read_json_object(path: Path, limit: int, what: str, error: type[MicropodError] = UsageError,
                     missing_ok: bool = False) -> dict[str, Any] | None:
    """The object in ``path`` (``what`` names it in errors); None if it is missing and ``missing_ok``."""
    try:
        with path.open("rb") as f:
            text = f.read(limit + 1)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise error(f"{what}: no such file") from None
    except OSError as exc:
        raise error(f"{what}: cannot be read: {exc.strerror}") from None
    if len(text) > limit:
        size = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit >> 10} KiB"
        raise error(f"{what} is over {size}")
    try:
        found = json.loads(text)
    except ValueError as exc:
        raise error(f"{what} is not valid JSON ({exc})") from None
    if not isinstance(found, dict):
        raise error(f"{what} is not a JSON object")
    return found
