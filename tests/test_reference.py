from __future__ import annotations

import pytest

from micropod.errors import InvalidReferenceError
from micropod.image.reference import parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, full, familiar", [
    ("nginx", "docker.io/library/nginx:latest", "nginx:latest"),
    ("nginx:1.25", "docker.io/library/nginx:1.25", "nginx:1.25"),
    ("user/app", "docker.io/user/app:latest", "user/app:latest"),
    ("docker.io/nginx", "docker.io/library/nginx:latest", "nginx:latest"),
    ("index.docker.io/library/nginx:x", "docker.io/library/nginx:x", "nginx:x"),
    ("localhost:5000/a/b:tag", "localhost:5000/a/b:tag", "localhost:5000/a/b:tag"),
    ("localhost/x", "localhost/x:latest", "localhost/x:latest"),
    ("ghcr.io/o/r/deep:v1.2_3-rc", "ghcr.io/o/r/deep:v1.2_3-rc", "ghcr.io/o/r/deep:v1.2_3-rc"),
    (f"nginx@{D}", f"docker.io/library/nginx@{D}", f"nginx@{D}"),
    (f"nginx:1@{D}", f"docker.io/library/nginx:1@{D}", f"nginx:1@{D}"),
    ("[::1]:5000/x:y", "[::1]:5000/x:y", "[::1]:5000/x:y"),
    ("a__b/c.d-e--f", "docker.io/a__b/c.d-e--f:latest", "a__b/c.d-e--f:latest"),
    ("Registry.Example/x", "Registry.Example/x:latest", "Registry.Example/x:latest"),
])
def test_normalisation(text, full, familiar):
    ref = parse_reference(text)
    assert str(ref) == full
    assert ref.familiar == familiar
    assert parse_reference(full) == ref


def test_fields():
    ref = parse_reference(f"localhost:5000/a/b:t@{D}")
    assert (ref.domain, ref.path, ref.tag, ref.digest) == ("localhost:5000", "a/b", "t", D)
    assert ref.repository == "localhost:5000/a/b"


@pytest.mark.parametrize("text, why", [
    ("", "empty"),
    ("Nginx", "lowercase"),
    ("user/App", "lowercase"),
    ("nginx:bad tag", "whitespace"),
    ("nginx:-x", "invalid tag"),
    ("nginx:" + "t" * 129, "invalid tag"),
    ("nginx@sha256:xyz", "invalid digest"),
    ("nginx@md5:" + "a" * 32, "unsupported digest"),
    ("nginx@sha256:" + "A" * 64, "unsupported digest"),
    ("a" * 64, "64-byte"),
    ("a//b", "component"),
    ("-a", "component"),
    ("a/b_", "component"),
    (":tag", "missing repository"),
    ("exa_mple.com/x", "invalid registry domain"),
    ("x/" + "a" * 260, "longer than"),
])
def test_invalid(text, why):
    with pytest.raises(InvalidReferenceError, match=why) as info:
        parse_reference(text)
    assert "\n" not in str(info.value)
