"""The issue 12 table: the right numbers from the scenarios' raw measurements, before and now."""

from __future__ import annotations

from typing import Any

from bench import issue12
from bench.results import Section


def _cold(node: float, upstream: float, dist1: float) -> dict[str, list[dict[str, float]]]:
    def record(seconds: float) -> list[dict[str, float]]:
        return [{"cold": seconds, "warm_first": seconds, "warm": seconds}]

    return {"shoal-node": record(node), "upstream": record(upstream), "dist1": record(dist1)}


def _sections(node_large: float, manifest_rate: float | None) -> list[Section]:
    cold = Section("cold", "2", "Cold single pull", "")
    cold.raw = {
        "large": _cold(node_large, 0.3, 0.6),
        "small": _cold(0.08, 0.04, 0.1),
        "many": {**_cold(0.2, 0.1, 0.4), "shoal": [{"cold": 1, "warm_first": 0.3, "warm": 0.1}]},
    }
    sections = [cold]
    if manifest_rate is not None:
        manifests = Section("manifests", "5", "Warm manifest requests", "")
        records: Any = [{"rate": manifest_rate, "p99": 0.012}, {"rate": manifest_rate + 200, "p99": 0.030}]
        manifests.raw = {"tag": {"shoal-node": records}, "digest": {"shoal-node": records}}
        sections.append(manifests)
    return sections


def _rows(section: Section) -> dict[str, list[str]]:
    return {row[0]: row[1:] for row in section.tables[0].rows}


def test_rows_are_ratios_of_the_same_run_with_before_beside_now() -> None:
    section = issue12.section(_sections(0.6, 5000), _sections(1.2, 1900), "python -m bench --json before.json")
    rows = _rows(section)
    # Speeds: the upstream's time ÷ the node's.
    assert rows["cold 256 MiB single pull, node speed ÷ straight from upstream"] == ["0.25", "0.50", "≥ 0.8", "**no**"]
    assert rows["cold 256 MiB single pull, node speed ÷ distribution proxy x1"][:2] == ["0.50", "1.00"]
    # Times: the node's ÷ the upstream's.
    assert rows["cold small image, time ÷ direct"] == ["2.00", "2.00", "≤ 1.5", "**no**"]
    assert rows["first warm pull through the balancer ÷ last warm pull (many layers)"][1] == "3.00"
    # Medians over the runs: (5000 + 5200) / 2; the p99 in milliseconds.
    assert rows["warm manifest by tag, one node, req/s"] == ["2,000", "5,100", "≥ 4,000", "yes"]
    assert rows["warm manifest by digest, one node, p99 ms"][1:] == ["21.0", "≤ 20", "**no**"]
    assert "before.json" in section.method


def test_what_was_not_measured_shows_as_a_dash() -> None:
    rows = _rows(issue12.section(_sections(0.6, None), None, None))
    assert rows["warm manifest by tag, one node, req/s"] == ["—", "—", "≥ 4,000", "—"]
    assert rows["cold burst C=32 over 3 nodes, wall ÷ direct"][1] == "—"
    assert rows["cold small image, time ÷ direct"][0] == "—"
