"""The table of issue 12 (cold pulls at wire speed, manifests from memory), before and now.

Each row is one number taken from the scenarios' raw measurements (the
ratio of two systems' medians over the runs, both measured in the same run). "now" comes
from this run; "before" from an earlier run's ``--json`` file given with
``--baseline``, so the two columns are the same measurements of two versions
of Shoal on the same machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from statistics import median
from typing import Any

from bench.results import Section, Table

Raw = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Row:
    measure: str
    # The row's number from the raw measurements by section key; None when not measured.
    value: Callable[[Raw], float | None]
    target: str
    met: Callable[[float], bool]
    digits: int = 2


def _median(records: list[dict[str, float]], field: str) -> float:
    return median(record[field] for record in records)


def _cold(image: str, numerator: str, denominator: str) -> Callable[[Raw], float | None]:
    """Time of ``numerator`` ÷ time of ``denominator`` for a cold pull of ``image`` (scenario 2)."""

    def value(raw: Raw) -> float | None:
        systems = raw.get("cold", {}).get(image)
        if not systems or numerator not in systems or denominator not in systems:
            return None
        return _median(systems[numerator], "cold") / _median(systems[denominator], "cold")

    return value


def _speed(image: str, node: str, reference: str) -> Callable[[Raw], float | None]:
    """Speed of ``node`` ÷ speed of ``reference``: the reference's time ÷ the node's."""
    time_ratio = _cold(image, node, reference)

    def value(raw: Raw) -> float | None:
        ratio = time_ratio(raw)
        return None if ratio is None else 1 / ratio

    return value


def _first_warm(raw: Raw) -> float | None:
    records = raw.get("cold", {}).get("many", {}).get("shoal")
    return _median(records, "warm_first") / _median(records, "warm") if records else None


def _burst(raw: Raw) -> float | None:
    systems = raw.get("burst", {}).get("small", {}).get("32", {})
    if "shoal" not in systems or "upstream" not in systems:
        return None
    return _median(systems["shoal"], "wall") / _median(systems["upstream"], "wall")


def _manifests(mode: str, field: str, scale: float = 1.0) -> Callable[[Raw], float | None]:
    def value(raw: Raw) -> float | None:
        records = raw.get("manifests", {}).get(mode, {}).get("shoal-node")
        if not records or any(field not in record for record in records):
            return None
        return _median(records, field) * scale

    return value


def _warm_blob(raw: Raw) -> float | None:
    by_concurrency = raw.get("throughput", {})
    if not by_concurrency:
        return None
    systems = by_concurrency[min(by_concurrency, key=int)]
    return median(systems["shoal-node"]) / median(systems["nginx"])


def _memory_rise(raw: Raw) -> float | None:
    """MiB a worker's peak grows by from the small to the large layer, warm (scenario 7)."""
    sizes = raw.get("memory", {})
    if len(sizes) != 2:
        return None
    small, large = sorted(sizes, key=int)
    growth = [median(r["growth"] for r in sizes[size]["warm"]) for size in (small, large)]
    return (growth[1] - growth[0]) / (1 << 20)


ROWS = (
    Row(
        "cold 256 MiB single pull, node speed ÷ straight from upstream",
        _speed("large", "shoal-node", "upstream"),
        "≥ 0.8",
        lambda v: v >= 0.8,
    ),
    Row(
        "cold 256 MiB single pull, node speed ÷ distribution proxy x1",
        _speed("large", "shoal-node", "dist1"),
        "≥ 1.5",
        lambda v: v >= 1.5,
    ),
    Row("cold small image, time ÷ direct", _cold("small", "shoal-node", "upstream"), "≤ 1.5", lambda v: v <= 1.5),
    Row("cold many-layer image, time ÷ direct", _cold("many", "shoal-node", "upstream"), "≤ 1.5", lambda v: v <= 1.5),
    Row("cold burst C=32 over 3 nodes, wall ÷ direct", _burst, "≤ 1.0", lambda v: v <= 1.0),
    Row(
        "first warm pull through the balancer ÷ last warm pull (many layers)",
        _first_warm,
        "≤ 1.3",
        lambda v: v <= 1.3,
    ),
    Row("warm manifest by tag, one node, req/s", _manifests("tag", "rate"), "≥ 4,000", lambda v: v >= 4000, 0),
    Row("warm manifest by tag, one node, p99 ms", _manifests("tag", "p99", 1000), "≤ 20", lambda v: v <= 20, 1),
    Row("warm manifest by digest, one node, req/s", _manifests("digest", "rate"), "≥ 4,000", lambda v: v >= 4000, 0),
    Row("warm manifest by digest, one node, p99 ms", _manifests("digest", "p99", 1000), "≤ 20", lambda v: v <= 20, 1),
    Row("warm blob, node ÷ nginx (one download)", _warm_blob, "≥ 0.9", lambda v: v >= 0.9),
    Row("worker peak rise, small to large layer, MiB", _memory_rise, "flat (≤ 16)", lambda v: v <= 16, 1),
)


def raw_by_key(sections: list[Section]) -> Raw:
    return {section.key: section.raw for section in sections}


def table(now: Raw, before: Raw | None) -> Table:
    """The issue's table: measure | before | now | target | met."""
    rows = []
    for row in ROWS:
        current = _safe(row.value, now)
        earlier = _safe(row.value, before) if before is not None else None
        rows.append(
            [
                row.measure,
                _show(earlier, row.digits),
                _show(current, row.digits),
                row.target,
                "—" if current is None else ("yes" if row.met(current) else "**no**"),
            ]
        )
    return Table(["measure", "before", "now", "target", "met"], rows)


def section(sections: list[Section], baseline: list[Section] | None, baseline_command: str | None) -> Section:
    before = raw_by_key(baseline) if baseline is not None else None
    method = (
        "The measures issue 12 set, taken from the scenarios below: each ratio is of two systems' medians "
        "over the runs, both measured in the same run (the scenarios' own tables give the median of the "
        "per-run ratios, which can differ). Speeds are the upstream's time ÷ the node's, times are "
        "the node's ÷ the upstream's. "
        + (
            "**before** is Shoal before the change, measured on this machine in an earlier run by "
            f"`{baseline_command}`."
            if baseline_command
            else "No earlier run was given (`--baseline`), so **before** is empty."
        )
    )
    result = Section("issue12", "0", "Issue 12: cold pulls at wire speed, manifests from memory", method)
    result.tables.append(table(raw_by_key(sections), before))
    return result


def _safe(value: Callable[[Raw], float | None], raw: Raw) -> float | None:
    try:
        return value(raw)
    except (KeyError, ValueError, ZeroDivisionError, TypeError):
        return None


def _show(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"
