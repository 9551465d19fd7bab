"""The slowest an upstream may send a body: ``upstream.min_rate`` over ``upstream.min_rate_window``.

A per-read timeout (``upstream.timeout``) ends a transfer that stops, but
not one that drips: an upstream sending a byte every 25 s answers every
read in time and would hold a fill slot, an upstream connection, the
cluster's lease on the blob and every client following the fill for as
long as it likes. ``MinRate`` measures a transfer in consecutive windows
of ``window`` seconds, counted from the start of the body, as curl's
``--speed-limit``/``--speed-time`` do: a window that brought less than
``rate`` bytes a second on average ends the transfer with
``UpstreamTooSlow``.

The check runs as bytes arrive, so the transfer ends at the first read
that returns after its window closed: at most ``window`` plus one read
(``upstream.timeout``) after the slow stretch began. The end of the body
is never checked (a last window is as short as it happens to be).

``node.upstream`` puts one under every body it reads: blobs (``BlobStream``),
manifests, tag lists and tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from node.errors import UpstreamTooSlow


class MinRate:
    """The floor of one transfer's rate; ``rate`` in bytes a second, ``window`` in seconds (0 rate: no floor)."""

    def __init__(
        self, rate: int, window: float, what: str, detail: object, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._window = window
        self._what = what
        self._detail = detail
        self._clock = clock
        self._started = clock()
        self._bytes = 0

    def add(self, size: int) -> None:
        """Count ``size`` bytes that just arrived; raise ``UpstreamTooSlow`` when a window fell short."""
        if self._rate <= 0:
            return
        self._bytes += size
        now = self._clock()
        elapsed = now - self._started
        if elapsed < self._window:
            return
        average = self._bytes / elapsed
        if average < self._rate:
            raise UpstreamTooSlow(
                f"{self._what}: {average:.0f} bytes/s over the last {elapsed:.1f} s,"
                f" below upstream.min_rate ({self._rate} bytes/s); the transfer was aborted",
                self._detail,
            )
        self._started, self._bytes = now, 0
