"""What the coordinator accepts as a digest, a node id and a lease key.

Values from requests end up inside Redis key names, so they are checked
before they reach a domain module: a malformed one is the caller's mistake
(``InvalidArgument``), never a stray key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from coordinator.errors import InvalidArgument

# The OCI image-spec digest grammar, with the two registered algorithms held
# to their exact encoded length.
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_KNOWN_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[a-f0-9]+")

MAX_NAME_LENGTH = 1024


def check_digest(value: str, field: str = "digest") -> str:
    """Return ``value`` when it is a well-formed digest, else raise ``InvalidArgument``."""
    if not _DIGEST.fullmatch(value or ""):
        raise InvalidArgument(f"{field}: expected a digest such as sha256:<64 hex digits>")
    algorithm, _, encoded = value.partition(":")
    length = _KNOWN_LENGTHS.get(algorithm)
    if length is not None and (len(encoded) != length or not _HEX.fullmatch(encoded)):
        raise InvalidArgument(f"{field}: a {algorithm} digest has {length} lowercase hex digits")
    return value


def check_digests(values: Iterable[str], field: str = "digests") -> list[str]:
    """Check every digest, dropping duplicates while keeping the order."""
    return list(dict.fromkeys(check_digest(value, field) for value in values))


def check_name(value: str, field: str) -> str:
    """Return ``value`` when it can be part of a key: not empty, bounded, one line."""
    if not value:
        raise InvalidArgument(f"{field}: required")
    if len(value) > MAX_NAME_LENGTH or any(ch in value for ch in "\r\n\0"):
        raise InvalidArgument(f"{field}: at most {MAX_NAME_LENGTH} characters on one line")
    return value
