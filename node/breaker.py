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
own, as it keeps its own channels. Transitions are logged once each and
reported to the ``Observer`` (the node's ``shoal_coordinator_reachable``
gauge). ``clock`` is monotonic. Safe to share between threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


class Observer(Protocol):
    def coordinator_reachable(self, address: str, reachable: bool) -> None:
        """The breaker of ``address`` closed (True) or opened (False) in this process."""
        ...


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
    """One breaker per address of ``addresses``, all closed at first."""

    def __init__(
        self,
        addresses: list[str],
        *,
        cool_off: float,
        clock: Callable[[], float] = time.monotonic,
        observer: Observer | None = None,
    ) -> None:
        self._breakers = [_Breaker(address) for address in addresses]
        self._cool_off = cool_off
        self._clock = clock
        self._observer = observer
        self._lock = threading.Lock()
        for breaker in self._breakers:
            self._report(breaker.address, True)

    def usable(self, first: int) -> list[int]:
        """The indices of the closed addresses, starting at ``first`` and wrapping around."""
        count = len(self._breakers)
        with self._lock:
            return [index for step in range(count) if not self._breakers[index := (first + step) % count].failure]

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
            breaker.probe_at = self._clock() + self._cool_off
            start = not breaker.probing
            breaker.probing = True
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
        log.info("coordinator %s answers again; using it", breaker.address)
        self._report(breaker.address, True)

    def probe_failed(self, index: int, code: str) -> None:
        """A probe of ``index`` got no answer either: probe again ``cool_off`` from now."""
        with self._lock:
            breaker = self._breakers[index]
            if breaker.failure:
                breaker.failure = code
                breaker.probe_at = self._clock() + self._cool_off

    def until_probe(self, index: int) -> float | None:
        """Seconds until ``index`` is due for a probe (0: now); None once it is closed: end the probe loop."""
        with self._lock:
            breaker = self._breakers[index]
            if not breaker.failure:
                breaker.probing = False
                return None
            return max(0.0, breaker.probe_at - self._clock())

    def skipped(self) -> list[str]:
        """``address: CODE`` for every open breaker, for error messages."""
        with self._lock:
            return [f"{breaker.address}: {breaker.failure}" for breaker in self._breakers if breaker.failure]

    def _report(self, address: str, reachable: bool) -> None:
        if self._observer is not None:
            self._observer.coordinator_reachable(address, reachable)
