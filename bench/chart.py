"""docs/benchmarks.png: the main numbers, one panel per kind, median with the spread as a bar."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from bench.results import Ratio, Section

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# Panel: its title, and whether its values are ratios (a dashed line marks parity, 1.0).
PANELS = {
    "amplification": ("Upstream amplification: upstream bytes ÷ image bytes (goal: 1.0)", True),
    "burst": ("Cold burst wall time: Shoal ÷ anchor (below 1: Shoal faster)", True),
    "reference": ("Shoal ÷ reference (cold pull ≤ 1.10 x upstream; warm blob ≥ 0.80 x nginx)", True),
    "warm": ("Warm pull time: Shoal ÷ anchor (below 1: Shoal faster)", True),
    "manifests": ("Manifest requests per second: Shoal ÷ anchor (above 1: Shoal faster)", True),
    "follower": ("First byte from node 2, ms (goal for the follower: 100 ms)", False),
    "memory": ("Worker peak memory rise while serving a layer, MiB (flat: the same at both sizes)", False),
}


def render(sections: list[Section], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped: dict[str, list[Ratio]] = {}
    for section in sections:
        for ratio in section.ratios:
            grouped.setdefault(ratio.panel, []).append(ratio)
    panels = [panel for panel in PANELS if panel in grouped]
    if not panels:
        return
    columns = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / columns)
    heights = [max(len(grouped[panel]) for panel in panels[row * columns : (row + 1) * columns]) for row in range(rows)]
    figure, axes = plt.subplots(
        rows,
        columns,
        figsize=(15, 1.2 + 0.32 * sum(heights) + 0.9 * rows),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for index, panel in enumerate(panels):
        title, parity = PANELS[panel]
        _panel(axes[index // columns][index % columns], title, grouped[panel], parity)
    for index in range(len(panels), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _panel(axis: Axes, title: str, ratios: list[Ratio], parity: bool) -> None:
    labels = [ratio.label for ratio in ratios]
    summaries = [ratio.summary for ratio in ratios]
    positions = list(range(len(ratios)))
    medians = [summary.median for summary in summaries]
    errors = [
        [summary.median - summary.low for summary in summaries],
        [summary.high - summary.median for summary in summaries],
    ]
    axis.barh(positions, medians, xerr=errors, color="#4c72b0", ecolor="#333333", capsize=3)
    for position, ratio, summary in zip(positions, ratios, summaries, strict=True):
        axis.annotate(
            f"{summary.median:.2f}",
            (summary.high, position),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
        if ratio.goal is not None:
            axis.plot([ratio.goal], [position], marker="|", color="#c44e52", markersize=14, mew=2)
    if parity:
        axis.axvline(1.0, color="#999999", linewidth=0.8, linestyle="--")
    axis.set_yticks(positions, labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_title(title, fontsize=9, loc="left")
    axis.margins(x=0.15)
