"""Names, tags and digests, validated against the OCI distribution grammar.

Everything a client sends that later becomes part of a file path or an
upstream URL passes through here first. The grammars admit no ``/`` in a
tag or digest and no ``.``-only path component in a name, so a validated
value can never point outside the cache directory.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from node.errors import DigestInvalid, NameInvalid, TagInvalid

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
NAME_MAX = 255

# The algorithms Shoal can verify, with the length of their hex encoding.
ALGORITHMS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[a-f0-9]+")


@dataclass(frozen=True)
class Digest:
    """A validated digest: ``algorithm:hex``."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)


def parse_name(name: str) -> str:
    if len(name) > NAME_MAX or not NAME.fullmatch(name):
        raise NameInvalid("invalid repository name", {"name": name[:NAME_MAX]})
    return name


def parse_tag(tag: str) -> str:
    if not TAG.fullmatch(tag):
        raise TagInvalid("invalid tag", {"tag": tag[:128]})
    return tag


def parse_digest(value: str) -> Digest:
    if len(value) > 200 or not DIGEST.fullmatch(value):
        raise DigestInvalid("invalid digest", {"digest": value[:200]})
    algorithm, _, encoded = value.partition(":")
    length = ALGORITHMS.get(algorithm)
    if length is None:
        raise DigestInvalid("unsupported digest algorithm", {"digest": value})
    if len(encoded) != length or not _HEX.fullmatch(encoded):
        raise DigestInvalid("invalid digest", {"digest": value})
    return Digest(algorithm, encoded)


def is_digest(reference: str) -> bool:
    """A manifest reference is a digest when it has a colon (tags cannot)."""
    return ":" in reference


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())


def normalize_name(name: str, docker_hub: bool) -> str:
    """Docker Hub keeps official images under ``library/``."""
    if docker_hub and "/" not in name:
        return f"library/{name}"
    return name
