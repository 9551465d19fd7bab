"""Medians, spreads and percentiles, and how the report prints them."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """The median of one value over the runs, with the smallest and largest."""

    median: float
    low: float
    high: float
    count: int

    def format(self, digits: int = 2, unit: str = "") -> str:
        text = f"{self.median:.{digits}f}{unit}"
        if self.count > 1 and (self.low != self.median or self.high != self.median):
            text += f" ({self.low:.{digits}f}-{self.high:.{digits}f})"
        return text


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("no values to summarize")
    return Summary(statistics.median(values), min(values), max(values), len(values))


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile: a value that was measured, never an interpolation."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Run-by-run ratios: each pair was measured in the same run, one after the other."""
    return [a / b for a, b in zip(numerators, denominators, strict=True)]
