"""How a request the agent cannot carry out is reported: an ``error`` reply with docker's exit code."""

from __future__ import annotations


class RequestError(Exception):
    def __init__(self, message: str, code: int = 125) -> None:
        super().__init__(message)
        self.code = code


def describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc}"
    return str(exc)
