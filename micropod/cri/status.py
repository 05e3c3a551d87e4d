"""micropod's errors as gRPC status codes, with the words containerd's CRI uses where kubelet keys on them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import grpc

from micropod.errors import ConflictError, MicropodError, NotFoundError, TimeoutExpired, UsageError


class CriError(MicropodError):
    """An error that names its own gRPC code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def not_found(what: str, ident: str) -> CriError:
    return CriError(grpc.StatusCode.NOT_FOUND, f"an error occurred when try to find {what} {ident!r}: not found")


_Record = TypeVar("_Record")
_Info = TypeVar("_Info")


def find_recorded(what: str, ident: str, lookup: Callable[[str], _Record],
                  info_of: Callable[[_Record], _Info | None]) -> tuple[_Record, _Info]:
    """The record that ``ident`` names, and the CRI's own record of it: NotFound, as containerd says it, if
    either is missing (a pod or container the CLI made is not the CRI's)."""
    if not ident:
        raise invalid(f"a {what} id is required")
    try:
        record = lookup(ident)
    except NotFoundError:
        raise not_found(what, ident) from None
    info = info_of(record)
    if info is None:
        raise not_found(what, ident)
    return record, info


def invalid(message: str) -> CriError:
    return CriError(grpc.StatusCode.INVALID_ARGUMENT, message)


def reserved(kind: str, name: str, owner: str) -> CriError:
    """containerd's name reservation: kubelet retries a create whose name is still held by an earlier one."""
    return CriError(grpc.StatusCode.UNKNOWN,
                    f'failed to reserve {kind} name "{name}": name "{name}" is reserved for "{owner}"')


def code_of(exc: MicropodError) -> grpc.StatusCode:
    if isinstance(exc, CriError):
        return exc.code
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, UsageError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, ConflictError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, TimeoutExpired):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.UNKNOWN
