"""``shoal.warm_plan``: image references as Docker reads them, and which platforms of an index are warmed."""

from __future__ import annotations

import pytest

from shoal.errors import WarmError
from shoal.warm_plan import _matches, parse_reference


@pytest.mark.parametrize(
    ("text", "registry", "name", "reference"),
    [
        ("alpine", None, "alpine", "latest"),
        ("alpine:3.19", None, "alpine", "3.19"),
        ("library/redis:7", None, "library/redis", "7"),
        ("ghcr.io/team/app:1.2", "ghcr.io", "team/app", "1.2"),
        ("localhost:5000/app", "localhost:5000", "app", "latest"),
        ("registry.local:5000/a/b:c", "registry.local:5000", "a/b", "c"),
        ("index.docker.io/library/alpine:3", "docker.io", "library/alpine", "3"),
        ("alpine:3.19@sha256:" + "a" * 64, None, "alpine", "sha256:" + "a" * 64),
        ("quay.io/x/y@sha256:" + "b" * 64, "quay.io", "x/y", "sha256:" + "b" * 64),
    ],
)
def test_references_are_parsed_as_docker_does(text: str, registry: str | None, name: str, reference: str) -> None:
    parsed = parse_reference(text)
    assert (parsed.registry, parsed.name, parsed.reference) == (registry, name, reference)
    assert parsed.params == ({"ns": registry} if registry else {})


@pytest.mark.parametrize(
    "text", ["", "Alpine:3", "alpine:", "alpine@sha256", "a//b", "alpine:bad/tag", "ghcr.io:x/app"]
)
def test_malformed_references_are_refused(text: str) -> None:
    with pytest.raises(WarmError):
        parse_reference(text)


def test_a_platform_matches_with_or_without_its_variant() -> None:
    assert _matches("linux/arm64/v8", ["linux/arm64"])
    assert _matches("linux/arm/v7", ["linux/arm/v7"])
    assert not _matches("linux/arm/v6", ["linux/arm/v7"])
    assert not _matches("linux/arm64", ["linux/arm64/v8"])
    assert not _matches(None, ["linux/amd64"])
