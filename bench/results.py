"""What a scenario hands to the report and the chart."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.stats import Summary, summarize


@dataclass(frozen=True)
class Table:
    columns: list[str]
    rows: list[list[str]]
    title: str = ""


@dataclass(frozen=True)
class Target:
    """One of the issue's targets: where the run stands against it."""

    goal: str
    measured: str
    met: bool


@dataclass(frozen=True)
class Ratio:
    """A main number for the chart, mostly a ratio: one value per run."""

    label: str
    values: list[float]
    # The chart panel it belongs to, and the value that marks the goal there.
    panel: str
    goal: float | None = None

    @property
    def summary(self) -> Summary:
        return summarize(self.values)


@dataclass
class Section:
    key: str
    number: str
    title: str
    # What is measured and how, in a few sentences of Markdown.
    method: str
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Every measured number, per run, for --json and the tests.
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """How the sections were measured: for the report's header."""

    command: str
    runs: int
    # ISO 8601, UTC.
    started: str
    seconds: float
    machine: dict[str, str]


def section_from_dict(data: dict[str, Any]) -> Section:
    """A section back from ``dataclasses.asdict``, as ``--json`` wrote it."""
    return Section(
        **{
            **data,
            "tables": [Table(**table) for table in data["tables"]],
            "targets": [Target(**target) for target in data["targets"]],
            "ratios": [Ratio(**ratio) for ratio in data["ratios"]],
        }
    )
