"""Image references with docker's normalisation: `nginx` is `docker.io/library/nginx:latest`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from micropod.errors import InvalidReferenceError

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

_PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_DOMAIN = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[a-fA-F0-9:]+\])(?::[0-9]+)?$"
)
_TAG = re.compile(r"^\w[\w.-]{0,127}$", re.ASCII)
_DIGEST = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$")
_SHA256_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HEX64 = re.compile(r"^[a-f0-9]{64}$")


@dataclass(frozen=True)
class Reference:
    domain: str
    path: str
    tag: str | None
    digest: str | None

    @property
    def repository(self) -> str:
        """`docker.io/library/nginx`: the name without tag or digest."""
        return f"{self.domain}/{self.path}"

    @property
    def familiar(self) -> str:
        """The short form docker shows: `nginx:latest`, `user/app:1`, `localhost/hello:latest`."""
        if self.domain == DEFAULT_DOMAIN:
            return self.path.removeprefix(OFFICIAL_REPO_PREFIX) + self._suffix()
        return str(self)

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.domain, self.path, tag, None)

    def _suffix(self) -> str:
        return (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")

    def __str__(self) -> str:
        return self.repository + self._suffix()


def _bad(text: str, why: str) -> InvalidReferenceError:
    return InvalidReferenceError(f"invalid reference format {text!r}: {why}")


def _split_domain(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    is_domain = slash and (any(c in first for c in ".:") or first == "localhost" or first.lower() != first)
    if not is_domain:
        domain, path = DEFAULT_DOMAIN, name
    else:
        domain, path = first, rest
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_REPO_PREFIX + path
    return domain, path


def parse_reference(text: str) -> Reference:
    """Parse and normalise a reference; a name without tag or digest gets `:latest`."""
    if not text:
        raise _bad(text, "empty reference")
    if text != text.strip() or any(c.isspace() for c in text):
        raise _bad(text, "contains whitespace")
    if _HEX64.match(text):
        raise _bad(text, "cannot specify a 64-byte hexadecimal string as a repository name")

    remainder, at, digest = text.partition("@")
    if at:
        if not _DIGEST.match(digest):
            raise _bad(text, f"invalid digest {digest!r}")
        if not _SHA256_DIGEST.match(digest):
            raise _bad(text, f"unsupported digest {digest!r}: only sha256 (lowercase hex) is supported")
    name, tag = remainder, None
    colon = remainder.rfind(":")
    if colon > remainder.rfind("/"):
        name, tag = remainder[:colon], remainder[colon + 1:]
        if not _TAG.match(tag):
            raise _bad(text, f"invalid tag {tag!r}")
    if not name:
        raise _bad(text, "missing repository name")

    domain, path = _split_domain(name)
    if not _DOMAIN.match(domain):
        raise _bad(text, f"invalid registry domain {domain!r}")
    if path.lower() != path:
        raise _bad(text, f"repository name ({path}) must be lowercase")
    for component in path.split("/"):
        if not _PATH_COMPONENT.match(component):
            raise _bad(text, f"invalid repository name component {component!r}")
    if len(f"{domain}/{path}") > NAME_TOTAL_LENGTH_MAX:
        raise _bad(text, f"repository name longer than {NAME_TOTAL_LENGTH_MAX} characters")

    if tag is None and not at:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest if at else None)


def has_explicit_domain(text: str) -> bool:
    """Whether `text` names its registry (so short-name fallbacks such as localhost/ must not apply)."""
    first, slash, _ = text.partition("/")
    return bool(slash) and (any(c in first for c in ".:") or first == "localhost" or first.lower() != first)
