"""Small test doubles and value makers shared by the coordinator's tests."""

from __future__ import annotations

import hashlib

START = 1_700_000_000.0


class FakeClock:
    """A clock that only moves when a test says so; call it like ``time.time``."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def digest(name: object) -> str:
    """A well-formed sha256 digest, distinct for each ``name``."""
    return "sha256:" + hashlib.sha256(str(name).encode()).hexdigest()
