"""The health of each coordinator address, as one process last saw it: a circuit breaker.

A node asks the coordinator several times per miss. When a coordinator
hangs (stopped, swapping, behind a link that drops packets) its connections
stay open and every call waits out its whole deadline; an image of six
blobs paid about eight deadlines before this. So each address has a
breaker, and only the first call pays:

    closed ──a call fails UNAVAILABLE or DEADLINE_EXCEEDED──▶ open
      ▲                                                        │
      └──────────────── a probe (or a call) answers ◀──────────┘
                        a probe fails: the next one cool_off later

- **closed**: calls go to the address.
- **open**: calls skip the address; when every address is open a call
  fails at once with ``CoordinatorUnavailable``, so the node is degraded
  without waiting for anything. ``cool_off`` after it opened, and again
  ``cool_off`` after each probe that failed, ``CoordinatorClient`` probes
  it in the background with a cheap call; the first answer closes it.

Any answer counts, a refusal included: the breaker tracks whether the
coordinator answers, not whether it agrees. A coordinator that answers
UNAVAILABLE because it cannot reach Redis stays open until Redis is back.

One ``Breakers`` belongs to one process: every gunicorn worker keeps its
own, as it keeps its own channels and probes. So that the other workers
of the node do not each pay a deadline to learn the same thing, a worker
whose breaker opens also leaves a mark (``Marks``: a small file per
address beside the cache) saying until when the address counts as down;
every worker skips a marked address. The worker that left the mark
renews it after each failed probe and removes it when its probe (or a
call) is answered. A mark holds ``2 * cool_off + probe_timeout``, longer
than the time between two renewals, so a mark whose worker died lapses
on its own soon after.

Transitions are logged once each and reported to the ``Observer`` (the
node's ``shoal_coordinator_reachable`` gauge). ``clock`` is monotonic;
marks hold its readings, which every process of the machine shares
(CLOCK_MONOTONIC). Safe to share between threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from node.storage.files import write_atomic
from node.storage.layout import Layout

log = logging.getLogger(__name__)


class Observer(Protocol):
    def coordinator_reachable(self, address: str, reachable: bool) -> None:
        """The breaker of ``address`` closed (True) or opened (False) in this process."""
        ...


class Shared(Protocol):
    """What every worker of the node knows: addresses one of them found down, and until when.

    Errors reading or writing are the implementation's to swallow: a mark
    that cannot be left costs a deadline in another worker, nothing more.
    """

    def down_until(self, address: str) -> float | None:
        """The ``clock`` reading until which ``address`` counts as down; None when it is not marked."""
        ...

    def mark_down(self, address: str, until: float) -> None: ...

    def clear(self, address: str) -> None: ...


class Marks:
    """``Shared`` as one small file per address in the node's cache (``Layout.coordinator_down``)."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout

    def _path(self, address: str) -> str:
        return self._layout.coordinator_down(hashlib.sha256(address.encode()).hexdigest()[:16])

    def down_until(self, address: str) -> float | None:
        try:
            with open(self._path(address), "rb") as handle:
                return float(handle.read(64))
        except (OSError, ValueError):
            return None

    def mark_down(self, address: str, until: float) -> None:
        try:
            write_atomic(self._path(address), repr(until).encode())
        except OSError as exc:
            log.warning("could not tell the other workers that coordinator %s is down: %s", address, exc)

    def clear(self, address: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(address))


@dataclass
class _Breaker:
    address: str
    # The status name of the failure that opened it; empty while closed.
    failure: str = ""
    # While open: when the next probe is due.
    probe_at: float = 0.0
    # A probe loop runs for it (from ``failed`` until ``until_probe`` says None).
    probing: bool = False


class Breakers:
    """One breaker per address of ``addresses``, all closed at first.

    ``probe_timeout`` is the longest a probe takes (its deadline); with
    ``cool_off`` it sets how long a mark in ``shared`` holds.
    """

    def __init__(
        self,
        addresses: list[str],
        *,
        cool_off: float,
        probe_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        observer: Observer | None = None,
        shared: Shared | None = None,
    ) -> None:
        self._breakers = [_Breaker(address) for address in addresses]
        self._cool_off = cool_off
        self._hold = 2 * cool_off + probe_timeout
        self._clock = clock
        self._observer = observer
        self._shared = shared
        self._lock = threading.Lock()
        for breaker in self._breakers:
            self._report(breaker.address, True)

    def usable(self, first: int) -> list[int]:
        """The indices of the addresses to try, starting at ``first`` and wrapping around.

        An address is tried while its breaker is closed and no other
        worker's mark says it is down.
        """
        count = len(self._breakers)
        with self._lock:
            closed = [index for step in range(count) if not self._breakers[index := (first + step) % count].failure]
        return [index for index in closed if not self._marked(index)]

    def failed(self, index: int, code: str) -> bool:
        """A call to ``index`` got no answer (``code``); True when the caller is to start a probe loop.

        That is when this opened the breaker and no probe loop runs for it
        yet (one that saw it closed has ended, or is about to).
        """
        with self._lock:
            breaker = self._breakers[index]
            if breaker.failure:
                return False
            breaker.failure = code
            now = self._clock()
            breaker.probe_at = now + self._cool_off
            start = not breaker.probing
            breaker.probing = True
        self._mark(breaker.address, now + self._hold)
        log.warning(
            "coordinator %s did not answer (%s); skipping it until it answers a probe (every %.1fs)",
            breaker.address,
            code,
            self._cool_off,
        )
        self._report(breaker.address, False)
        return start

    def succeeded(self, index: int) -> None:
        """``index`` answered a call or a probe: use it again."""
        with self._lock:
            breaker = self._breakers[index]
            if not breaker.failure:
                return
            breaker.failure = ""
        if self._shared is not None:
            self._shared.clear(breaker.address)
        log.info("coordinator %s answers again; using it", breaker.address)
        self._report(breaker.address, True)

    def probe_failed(self, index: int, code: str) -> None:
        """A probe of ``index`` got no answer either: probe again ``cool_off`` from now."""
        with self._lock:
            breaker = self._breakers[index]
            if not breaker.failure:
                return
            breaker.failure = code
            now = self._clock()
            breaker.probe_at = now + self._cool_off
        self._mark(breaker.address, now + self._hold)

    def until_probe(self, index: int) -> float | None:
        """Seconds until ``index`` is due for a probe (0: now); None once it is closed: end the probe loop."""
        with self._lock:
            breaker = self._breakers[index]
            if not breaker.failure:
                breaker.probing = False
                return None
            return max(0.0, breaker.probe_at - self._clock())

    def skipped(self) -> list[str]:
        """Why each address that ``usable`` leaves out is left out, for error messages."""
        with self._lock:
            failures = [breaker.failure for breaker in self._breakers]
        reasons = []
        for index, failure in enumerate(failures):
            address = self._breakers[index].address
            if failure:
                reasons.append(f"{address}: {failure}, skipped until it answers a probe")
            elif self._marked(index):
                reasons.append(f"{address}: skipped, another worker found it down")
        return reasons

    def _marked(self, index: int) -> bool:
        if self._shared is None:
            return False
        until = self._shared.down_until(self._breakers[index].address)
        # A mark further ahead than any mark can reach was not left on this
        # boot's clock (the machine restarted): it is ignored.
        return until is not None and 0 < until - self._clock() <= self._hold

    def _mark(self, address: str, until: float) -> None:
        if self._shared is not None:
            self._shared.mark_down(address, until)

    def _report(self, address: str, reachable: bool) -> None:
        if self._observer is not None:
            self._observer.coordinator_reachable(address, reachable)
