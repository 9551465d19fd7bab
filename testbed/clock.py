"""The one fake clock of the test suite, for code that takes ``clock=`` and ``sleep=``."""

from __future__ import annotations

import threading

# A plausible wall-clock time (November 2023), so that values stored as
# timestamps look like real ones.
START = 1_700_000_000.0


class FakeClock:
    """Time that passes only when a test says so, and never backwards.

    Pass the clock itself where code reads ``time.time`` or
    ``time.monotonic`` (calling it is ``now()``), and ``clock.sleep`` where
    it calls ``time.sleep``: a sleep returns at once, having moved the clock
    on by its length, and is kept in ``sleeps`` for the test to look at.
    Safe to share between threads.
    """

    def __init__(self, start: float = START) -> None:
        self._now = start
        self._lock = threading.Lock()
        self.sleeps: list[float] = []

    def now(self) -> float:
        with self._lock:
            return self._now

    def __call__(self) -> float:
        return self.now()

    def advance(self, seconds: float) -> None:
        """Move time on by ``seconds``; moving it back is refused with ``ValueError``."""
        if seconds < 0:
            raise ValueError(f"time never goes back; cannot advance by {seconds}")
        with self._lock:
            self._now += seconds

    def sleep(self, seconds: float) -> None:
        """Return at once, ``seconds`` later; a negative length is refused as ``time.sleep`` refuses it."""
        self.advance(seconds)
        with self._lock:
            self.sleeps.append(seconds)
