"""A VM's credential: a short-lived JWT (EdDSA over Ed25519, through PyJWT) signed with the host's key.

Services on the host check one with ``verify`` (the library call the README documents), or with
``micropod token verify``; services elsewhere check it against ``micropod token jwks``.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from micropod.errors import UsageError
from micropod.metadata.keyring import MAX_LIFETIME, CredentialError, KeyRing
from micropod.net.owner import Owner
from micropod.paths import StateRoot

ALGORITHM = "EdDSA"
DEFAULT_AUDIENCE = "micropod"
DEFAULT_LIFETIME = 600
MAX_AUDIENCE = 256
LEEWAY = 5  # seconds of clock skew a verifier allows


def issuer(root: StateRoot) -> str:
    """One state root's name as an issuer: two roots on one host never accept each other's credentials."""
    return f"urn:micropod:{Owner.of(root.path).tag}"


def check_audience(audience: str) -> str:
    if not audience or len(audience) > MAX_AUDIENCE or not audience.isprintable() or audience.strip() != audience:
        raise UsageError(f"invalid audience {audience[:40]!r}: 1 to {MAX_AUDIENCE} printable characters, "
                         "without surrounding spaces")
    return audience


def default_audience() -> str:
    return check_audience(os.environ.get("MICROPOD_CREDENTIAL_AUDIENCE", DEFAULT_AUDIENCE))


def lifetime() -> int:
    """MICROPOD_CREDENTIAL_LIFETIME seconds (60 to MAX_LIFETIME), 600 by default."""
    text = os.environ.get("MICROPOD_CREDENTIAL_LIFETIME", str(DEFAULT_LIFETIME))
    if not text.isdigit() or not 60 <= int(text) <= MAX_LIFETIME:
        raise UsageError(f"invalid MICROPOD_CREDENTIAL_LIFETIME {text[:20]!r}: whole seconds, 60 to {MAX_LIFETIME}")
    return int(text)


@dataclass(frozen=True)
class Subject:
    """Whom a VM's credentials name: its id (the container's, or the pod's), name and image."""

    vm_id: str
    name: str
    image: str
    image_digest: str


class Issuer:
    def __init__(self, root: StateRoot, clock: Callable[[], float] | None = None) -> None:
        self.root = root
        self.keys = KeyRing(root, clock)
        self._clock = clock or (lambda: time.time())

    def mint(self, subject: Subject, audience: str, seconds: int) -> tuple[str, int]:
        """The token and its expiry (Unix seconds)."""
        import jwt

        key = self.keys.signing_key()
        now = int(self._clock())
        claims = {"iss": issuer(self.root), "sub": subject.vm_id, "aud": audience, "iat": now, "nbf": now,
                  "exp": now + seconds, "jti": str(uuid.uuid4()), "name": subject.name, "image": subject.image,
                  "image_digest": subject.image_digest}
        token = jwt.encode(claims, key.private_key(), algorithm=ALGORITHM, headers={"kid": key.kid})
        return token, now + seconds


def verify(token: str, audience: str | None = None, root: StateRoot | None = None,
           any_audience: bool = False) -> dict[str, Any]:
    """The claims of a credential this state root issued, checked: signature by one of its keys (a rotated-out
    key too, until its tokens expire), issuer, expiry and the audience (``audience``, else the default one; a
    guest may ask for a credential of any audience, so only ``any_audience`` skips the check). CredentialError
    says which check failed."""
    import jwt

    root = root or StateRoot.from_env()
    audience = None if any_audience else check_audience(audience) if audience is not None else default_audience()
    token = token.strip()
    try:
        header = jwt.get_unverified_header(token)
    except jwt.DecodeError as exc:
        raise CredentialError(f"not a credential: {exc}") from None
    kid = header.get("kid")
    if header.get("alg") != ALGORITHM or not isinstance(kid, str):
        raise CredentialError(f"not a credential of micropod's: its algorithm is {header.get('alg')!r}, "
                              f"not {ALGORITHM} with a key id")
    key = KeyRing(root).find(kid)
    if key is None:
        raise CredentialError(f"unknown key {kid[:64]!r}: not one of this host's keys (another host's, or "
                              "rotated out since its tokens expired)")
    options = {"require": ["iss", "sub", "aud", "iat", "exp", "jti"], "verify_aud": audience is not None}
    try:
        claims: dict[str, Any] = jwt.decode(token, key.public_key(), algorithms=[ALGORITHM], audience=audience,
                                            issuer=issuer(root), options=options, leeway=LEEWAY)  # type: ignore[arg-type]
    except jwt.ExpiredSignatureError:
        raise CredentialError("the credential has expired") from None
    except jwt.InvalidAudienceError:
        raise CredentialError(f"wrong audience: the credential is not for {audience!r}") from None
    except jwt.InvalidSignatureError:
        raise CredentialError("bad signature: the credential was altered, or not signed by this host") from None
    except jwt.InvalidIssuerError:
        raise CredentialError("wrong issuer: the credential is another state root's") from None
    except jwt.PyJWTError as exc:
        raise CredentialError(f"invalid credential: {exc}") from None
    return claims
