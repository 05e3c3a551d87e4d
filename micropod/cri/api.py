"""The generated CRI messages (micropod/cri/generate.py builds them from specs/cri-api-v1.proto)."""

from __future__ import annotations

from micropod.errors import GuestMissingError

try:
    from micropod.cri.gen import api_pb2 as pb
except ImportError as exc:  # pragma: no cover - a checkout that skipped `make setup`
    raise GuestMissingError("the CRI stubs are not generated; run `make setup` (or python -m micropod.cri.generate)"
                            ) from exc

__all__ = ["pb"]
