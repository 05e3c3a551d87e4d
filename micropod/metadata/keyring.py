"""The host's signing keys for VM credentials: Ed25519, in the state root (``credential-keys.json``, 0600).

The newest key signs. ``rotate`` adds a new one and retires the current one, which still verifies the tokens it
signed until they have all expired (``MAX_LIFETIME`` after its retirement); after that it is dropped. Every
change happens under a lock and is written atomically, so concurrent rotations and monitors reading the file
never see half of it. Key ids are RFC 7638 thumbprints of the public key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from micropod.errors import MicropodError
from micropod.fsutil import PRIVATE_FILE, atomic_write, flock
from micropod.jsonfile import read_json_object
from micropod.paths import StateRoot

KEYS_FILE = "credential-keys.json"
MAX_LIFETIME = 3600  # seconds: no credential lives longer, so a retired key is kept this long
MAX_KEYS_FILE = 1 << 20
FORMAT = 1


class CredentialError(MicropodError):
    """A credential that does not verify, or keys that cannot be read: one clear line."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class SigningKey:
    kid: str
    seed: bytes  # the 32-byte Ed25519 private key
    created: float
    retired: float | None = None

    @classmethod
    def generate(cls, now: float) -> SigningKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

        seed = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return cls(thumbprint(public_bytes(seed)), seed, now)

    def private_key(self) -> Any:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(self.seed)

    def public_key(self) -> Any:
        return self.private_key().public_key()

    def jwk(self) -> dict[str, str]:
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url(public_bytes(self.seed)), "kid": self.kid,
                "alg": "EdDSA", "use": "sig"}

    def to_json(self) -> dict[str, Any]:
        return {"kid": self.kid, "seed": b64url(self.seed), "created": self.created, "retired": self.retired}

    @classmethod
    def from_json(cls, raw: Any) -> SigningKey:
        if not isinstance(raw, dict) or not isinstance(raw.get("seed"), str):
            raise ValueError("a key is not an object with a seed")
        seed = _unb64url(raw["seed"])
        if len(seed) != 32:
            raise ValueError("a key's seed is not 32 bytes")
        retired = raw.get("retired")
        return cls(thumbprint(public_bytes(seed)), seed, float(raw["created"]),
                   None if retired is None else float(retired))


def public_bytes(seed: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def thumbprint(public: bytes) -> str:
    """RFC 7638: the SHA-256 of the JWK's required members, in lexical order, without spaces."""
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": b64url(public)}, separators=(",", ":"),
                           sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


class KeyRing:
    def __init__(self, root: StateRoot, clock: Callable[[], float] | None = None) -> None:
        self.path: Path = root.path / KEYS_FILE
        self._lock = root.path / f".{KEYS_FILE}.lock"
        self._clock = clock or (lambda: time.time())

    def keys(self) -> list[SigningKey]:
        """The keys that verify (the signing key first); a first call makes the first key."""
        keys = self._read()
        if keys and keys[0].retired is None:
            return keys
        with flock(self._lock):
            keys = self._read()
            if not keys or keys[0].retired is not None:
                keys = self._write([SigningKey.generate(self._clock()), *keys])
        return keys

    def signing_key(self) -> SigningKey:
        return self.keys()[0]

    def find(self, kid: str) -> SigningKey | None:
        return next((key for key in self.keys() if key.kid == kid), None)

    def rotate(self) -> tuple[SigningKey, SigningKey | None]:
        """A new signing key; the previous one (returned second) verifies until its tokens expire."""
        with flock(self._lock):
            now = self._clock()
            keys = self._read()
            previous = keys[0] if keys and keys[0].retired is None else None
            retired = [SigningKey(k.kid, k.seed, k.created, k.retired if k.retired is not None else now)
                       for k in keys]
            fresh = SigningKey.generate(now)
            self._write([fresh, *retired])
        return fresh, previous

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [key.jwk() for key in self.keys()]}

    def _read(self) -> list[SigningKey]:
        raw = read_json_object(self.path, MAX_KEYS_FILE, f"{self.path}: the credential keys", CredentialError,
                               missing_ok=True)
        if raw is None:
            return []
        try:
            if raw.get("format") != FORMAT:
                raise ValueError(f"not a format-{FORMAT} key file")
            keys = [SigningKey.from_json(item) for item in raw["keys"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise CredentialError(f"{self.path}: the credential keys cannot be read ({exc})") from None
        now = self._clock()
        return [k for k in keys if k.retired is None or now < k.retired + MAX_LIFETIME]

    def _write(self, keys: list[SigningKey]) -> list[SigningKey]:
        document = {"format": FORMAT, "keys": [key.to_json() for key in keys]}
        atomic_write(self.path, json.dumps(document, indent=1).encode(), mode=PRIVATE_FILE)
        return keys
