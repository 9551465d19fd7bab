"""Digests for the coordinator's tests: well-formed, distinct, made from any name."""

from __future__ import annotations

import hashlib


def digest(name: object) -> str:
    """A well-formed sha256 digest, distinct for each ``name``."""
    return "sha256:" + hashlib.sha256(str(name).encode()).hexdigest()
