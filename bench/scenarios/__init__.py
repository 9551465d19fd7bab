"""The scenarios: each takes the running stack and the settings, and returns a report section.

Within a run every system is measured one after the other, in an order
that rotates from run to run, so that a slow moment of this shared machine
does not always fall on the same system. Ratios are taken run by run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from bench.stats import Summary, summarize


def rotate(systems: Sequence[str], run: int) -> list[str]:
    shift = run % len(systems)
    return [*systems[shift:], *systems[:shift]]


_STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"bench [{time.monotonic() - _STARTED:6.1f}s] {text}", file=sys.stderr, flush=True)


def show(values: Sequence[float], digits: int = 2, unit: str = "") -> str:
    return summarize(values).format(digits, unit)


def mib(value: float) -> float:
    return value / (1024 * 1024)


def human_size(value: float) -> str:
    """A byte count as people write it: 256 KiB, 13.3 MiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            number = value / scale
            return f"{number:.0f} {unit}" if number == int(number) or number >= 100 else f"{number:.1f} {unit}"
    return f"{value:.0f} B"


def median(values: Sequence[float]) -> float:
    return summarize(values).median


__all__ = ["Summary", "human_size", "median", "mib", "rotate", "say", "show"]
