"""How ``shoal warm`` shows each image as it goes: a bar on a terminal, plain lines in a log.

``Progress`` is what the warm runner reports to, one instance per image:
``planned`` once, ``advance`` and ``blob_done`` from the download threads,
``finished`` once at the end. ``BarProgress`` redraws one line in place;
``LineProgress`` prints a line per event, for output that is not a terminal.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Protocol, TextIO

from shoal.warm_plan import Blob, Plan


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def human_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("not reached")


class Progress(Protocol):
    """What happens to one image, as it happens; ``advance`` and ``blob_done`` come from several threads."""

    def planned(self, plan: Plan) -> None: ...

    def advance(self, count: int) -> None: ...

    def blob_done(self, blob: Blob) -> None: ...

    def finished(self, error: str | None) -> None: ...


class _Counts:
    def __init__(self, label: str, clock: Callable[[], float]) -> None:
        self.label = label
        self.clock = clock
        self.started = clock()
        self.lock = threading.Lock()
        self.total_bytes = 0
        self.total_layers = 0
        self.bytes = 0
        self.layers = 0

    def plan(self, plan: Plan) -> None:
        self.total_bytes, self.total_layers = plan.size, plan.layers

    def elapsed(self) -> float:
        return self.clock() - self.started


class BarProgress:
    """One line per image on a terminal, redrawn in place: a bar, bytes and layers.

    The line never wraps, which would break the redrawing: on a narrow
    terminal the image's name is shortened from the left first.
    """

    BAR = 24

    def __init__(
        self,
        label: str,
        out: TextIO,
        clock: Callable[[], float] = time.monotonic,
        columns: Callable[[], int] | None = None,
    ) -> None:
        self.counts = _Counts(label, clock)
        self.out = out
        self.columns = columns or self._terminal_columns
        self._last_draw = 0.0
        self._draw(force=True)

    def _terminal_columns(self) -> int:
        try:
            return os.get_terminal_size(self.out.fileno()).columns or 80
        except (OSError, ValueError, AttributeError):
            return 80

    def planned(self, plan: Plan) -> None:
        with self.counts.lock:
            self.counts.plan(plan)
            self._draw(force=True)

    def advance(self, count: int) -> None:
        with self.counts.lock:
            self.counts.bytes += count
            self._draw()

    def blob_done(self, blob: Blob) -> None:
        with self.counts.lock:
            self.counts.layers += blob.is_layer
            self._draw(force=True)

    def finished(self, error: str | None) -> None:
        with self.counts.lock:
            counts = self.counts
            tail = f"done in {counts.elapsed():.1f}s" if error is None else f"FAILED: {error}"
            self._draw(force=True, tail=tail)
            self.out.write("\n")
            self.out.flush()

    def line(self, width: int, tail: str = "") -> str:
        """The line as drawn, at most ``width`` characters."""
        counts = self.counts
        if counts.total_bytes:
            share = min(1.0, counts.bytes / counts.total_bytes)
            filled = round(share * self.BAR)
            bar = f"[{'#' * filled}{'.' * (self.BAR - filled)}] {share * 100:3.0f}%"
            size = f"{human_bytes(counts.bytes)} / {human_bytes(counts.total_bytes)}"
            status = f"{bar}  {size}  {counts.layers}/{counts.total_layers} layers"
        else:
            status = "resolving..."
        if tail:
            status = f"{status}  {tail}"
        room = width - len(status) - 2
        label = counts.label
        if len(label) > room:
            label = "..." + label[-(room - 3) :] if room > 12 else label[: max(room, 12)]
        return f"{label}  {status}"[:width]

    def _draw(self, force: bool = False, tail: str = "") -> None:
        now = self.counts.clock()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        # One column short of the edge: a full line would move the cursor on some terminals.
        self.out.write("\r\x1b[K" + self.line(max(20, self.columns() - 1), tail))
        self.out.flush()


class LineProgress:
    """Plain lines for logs (stdout is not a terminal): the plan, each finished layer, the end."""

    def __init__(self, label: str, out: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.counts = _Counts(label, clock)
        self.out = out

    def _print(self, text: str) -> None:
        self.out.write(f"{self.counts.label}: {text}\n")
        self.out.flush()

    def planned(self, plan: Plan) -> None:
        with self.counts.lock:
            self.counts.plan(plan)
            platforms = f" for {', '.join(plan.platforms)}" if plan.platforms else ""
            self._print(
                f"{plural(plan.layers, 'layer')}, {human_bytes(plan.size)} in {plural(len(plan.blobs), 'blob')}, "
                f"{plural(plan.manifests, 'manifest')}{platforms}"
            )

    def advance(self, count: int) -> None:
        with self.counts.lock:
            self.counts.bytes += count

    def blob_done(self, blob: Blob) -> None:
        with self.counts.lock:
            counts = self.counts
            if blob.is_layer:
                counts.layers += 1
                what = f"layer {counts.layers}/{counts.total_layers}"
            else:
                what = "config"
            self._print(
                f"{what} {blob.digest[:19]} {human_bytes(blob.size)} "
                f"({human_bytes(counts.bytes)} / {human_bytes(counts.total_bytes)})"
            )

    def finished(self, error: str | None) -> None:
        with self.counts.lock:
            counts = self.counts
            if error is None:
                self._print(f"done, {human_bytes(counts.bytes)} in {counts.elapsed():.1f}s")
            else:
                self._print(f"FAILED: {error}")
