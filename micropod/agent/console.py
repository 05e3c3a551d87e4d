"""The guest console: where the agent says what the host may never hear."""

from __future__ import annotations

import os


def console(message: str) -> None:
    """The VMM logs the console, so the host can show its tail when the agent cannot talk."""
    write_quietly(2, f"micropod-agent: {message}\n".encode(errors="replace"))


def write_quietly(fd: int, data: bytes) -> bool:
    try:
        os.write(fd, data)
    except OSError:
        return False
    return True
