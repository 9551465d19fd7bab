"""``shoal.warm_progress``: the plain lines of a log and the bar of a terminal."""

from __future__ import annotations

import io

from shoal.warm_plan import Blob, Plan
from shoal.warm_progress import BarProgress, LineProgress


def test_plain_lines_show_each_layer_and_the_end() -> None:
    ticks = iter([0.0, 2.5])
    out = io.StringIO()
    progress = LineProgress("app:1", out, clock=lambda: next(ticks))
    config, layer = Blob("sha256:" + "c" * 64, 1_000, False), Blob("sha256:" + "d" * 64, 2_500_000, True)
    progress.planned(Plan(manifests=1, blobs={config.digest: config, layer.digest: layer}))
    progress.advance(1_000)
    progress.blob_done(config)
    progress.advance(2_500_000)
    progress.blob_done(layer)
    progress.finished(None)
    assert out.getvalue().splitlines() == [
        "app:1: 1 layer, 2.5 MB in 2 blobs, 1 manifest",
        "app:1: config sha256:cccccccccccc 1.0 kB (1.0 kB / 2.5 MB)",
        "app:1: layer 1/1 sha256:dddddddddddd 2.5 MB (2.5 MB / 2.5 MB)",
        "app:1: done, 2.5 MB in 2.5s",
    ]


def test_the_bar_fits_a_narrow_terminal_by_shortening_the_name() -> None:
    out = io.StringIO()
    progress = BarProgress("registry.example/" + "very-long-name/" * 4 + "app:1", out, clock=lambda: 0.0)
    layer = Blob("sha256:" + "d" * 64, 4_000_000, True)
    progress.planned(Plan(manifests=1, blobs={layer.digest: layer}))
    progress.advance(1_000_000)
    line = progress.line(80)
    assert len(line) == 80
    assert line.startswith("...") and "name/app:1  [######..................]  25%  1.0 MB / 4.0 MB  0/1 layers" in line
    assert progress.line(200).startswith("registry.example/very-long-name/")
