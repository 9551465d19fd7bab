"""The upstream's rate-limit budget: when tag checks pause, and until when.

A registry that rate-limits says so in its answers. Docker Hub sends, on
manifest requests::

    ratelimit-limit: 100;w=21600        pulls allowed per window of w seconds
    ratelimit-remaining: 76;w=21600     pulls left in the current window

and, once the budget is spent, ``429 Too Many Requests``, perhaps with
``Retry-After`` (seconds, or an HTTP date). The IETF draft adds
``ratelimit-reset`` (seconds until the window resets). ``Budget.record``
reads every answer of the upstream and decides:

- **429**: tag checks pause until ``Retry-After``, else ``ratelimit-reset``,
  else the window (``w=``), else ``DEFAULT_PAUSE``.
- **remaining below the floor** (``upstreams.<name>.ratelimit_floor``; 0
  turns it off): tag checks pause until ``ratelimit-reset``, else for
  ``DEFAULT_PAUSE``, after which the next tag check (a HEAD, which Docker
  Hub does not count) refreshes the count. Waiting out the whole window
  instead (six hours on Docker Hub) would keep tags stale long after the
  budget recovered. A later answer at or above the floor ends such a pause
  at once; a 429 pause ends only with its time.

Every pause is capped at ``MAX_PAUSE``, so that no header, however hostile
or malformed, stops tag checks for longer; a header that does not parse is
ignored (never raised). While paused, a tag request the node can answer from
its cache is answered stale without asking the upstream
(``skipped_tag_check`` counts each). Everything else still goes to the
upstream: manifests and blobs by digest, and tags the node cannot answer.

The pause is shared by the workers of a node through a small file
(``<cache.dir>/budget/<registry>.json``, written atomically; a reader sees
the old pause or the new one), read only on the paths that would otherwise
ask the upstream. Two workers recording at once: the last write wins, and
both wrote a pause the upstream asked for. Times are wall-clock seconds
(Unix time), the same in every process and comparable with an HTTP date.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from node.config import UpstreamConfig
from node.storage.files import write_atomic
from protos.metrics import budget_pause_key, tag_checks_skipped_key

log = logging.getLogger(__name__)

# The longest pause any answer can cause, and the pause when an answer says
# nothing about its window.
MAX_PAUSE = 3600.0
DEFAULT_PAUSE = 60.0

REFUSED = "429"
LOW = "floor"

# Unix times above this (September 2001) in ``ratelimit-reset`` are read as a
# moment rather than a number of seconds: some servers send one.
_EPOCH_RESET = 1_000_000_000
# At most 15 digits: int() of a longer string is slow or refused, and no
# honest count or number of seconds is that long.
_COUNT = re.compile(r"\s*(\d{1,15})\s*")
_WINDOW = re.compile(r"\s*w\s*=\s*(\d{1,15})\s*")
# A file larger than this is not a pause this module wrote.
_STATE_MAX = 256


class Observer(Protocol):
    """Where the budget counts (``node.metrics.Metrics``)."""

    def add(self, counter: str, value: int = 1) -> None: ...


class _Unobserved:
    def add(self, counter: str, value: int = 1) -> None:
        pass


@dataclass(frozen=True)
class Pause:
    """Tag checks pause until ``until`` (Unix seconds), because of ``reason`` (``REFUSED`` or ``LOW``)."""

    until: float
    reason: str

    def left(self, now: float) -> float:
        """Seconds of the pause still to go; 0 when it is over or not believable (past the cap)."""
        left = self.until - now
        # A second of slack for rounding: ``now + MAX_PAUSE - now`` may come out a hair above it.
        return left if 0 < left <= MAX_PAUSE + 1 else 0.0

    def encode(self) -> bytes:
        return json.dumps({"until": self.until, "reason": self.reason}).encode()

    @staticmethod
    def decode(data: bytes) -> Pause | None:
        """The pause in ``data``, or None when it holds none (or garbage)."""
        try:
            document = json.loads(data)
        except ValueError:
            return None
        if not isinstance(document, dict):
            return None
        until, reason = document.get("until"), document.get("reason")
        if not isinstance(until, int | float) or isinstance(until, bool) or not math.isfinite(until):
            return None
        if reason not in (REFUSED, LOW):
            return None
        return Pause(float(until), reason)


class Budget:
    """One upstream's pause of tag checks, shared by a node's workers when given a ``path``.

    Without a path the pause lives in this object only (a client made on its
    own, in tests or tools).
    """

    def __init__(
        self,
        config: UpstreamConfig,
        path: str | None = None,
        *,
        clock: Callable[[], float] = time.time,
        observer: Observer | None = None,
    ) -> None:
        self.registry = config.name
        self.floor = config.ratelimit_floor
        self._path = path
        self._clock = clock
        self._observer: Observer = observer or _Unobserved()
        self._pause: Pause | None = None

    def paused(self) -> float:
        """Seconds until tag checks resume; 0.0 while they are not paused."""
        pause = self._load()
        return 0.0 if pause is None else pause.left(self._clock())

    def skipped_tag_check(self) -> None:
        """Count a tag answered from the cache, stale, instead of being checked while paused."""
        self._observer.add(tag_checks_skipped_key(self.registry))

    def record(self, status: int, headers: Mapping[str, str]) -> None:
        """Read one answer of the upstream: begin, extend or end a pause. Never raises on bad headers."""
        now = self._clock()
        remaining, window = parse_count(headers.get("ratelimit-remaining"))
        if window is None:
            window = parse_count(headers.get("ratelimit-limit"))[1]
        reset = parse_reset(headers.get("ratelimit-reset"), now)
        if status == 429:
            retry_after = parse_retry_after(headers.get("retry-after"), now)
            seconds = _first(retry_after, reset, window, DEFAULT_PAUSE)
            self._pause_for(seconds, REFUSED, now, why="answered 429 Too Many Requests")
        elif remaining is not None and remaining < self.floor:
            why = f"has {remaining} requests left (ratelimit-remaining), below the floor of {self.floor}"
            self._pause_for(_first(reset, DEFAULT_PAUSE), LOW, now, why=why)
        elif remaining is not None:
            self._end_low_pause(remaining, now)

    def _pause_for(self, seconds: float, reason: str, now: float, *, why: str) -> None:
        seconds = min(seconds, MAX_PAUSE)
        if seconds <= 0:
            return
        until = now + seconds
        current = self._load()
        if current is not None and current.left(now) > 0:
            # A pause only grows, and once the upstream refused it stays refused.
            if REFUSED in (reason, current.reason):
                reason = REFUSED
            if until < current.until + 1 and reason == current.reason:
                return
            until = max(until, current.until)
        if current is None or current.left(now) == 0 or reason != current.reason:
            self._observer.add(budget_pause_key(reason, self.registry))
            log.warning(
                "upstream %s %s: tag checks pause for %.0f s; cached tags are served stale meanwhile",
                self.registry,
                why,
                until - now,
            )
        self._store(Pause(until, reason))

    def _end_low_pause(self, remaining: int, now: float) -> None:
        current = self._load()
        if current is None or current.reason != LOW or current.left(now) == 0:
            return
        log.info("upstream %s has %d requests left again: tag checks resume", self.registry, remaining)
        self._store(None)

    def _load(self) -> Pause | None:
        if self._path is None:
            return self._pause
        try:
            with open(self._path, "rb") as handle:
                data = handle.read(_STATE_MAX + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read the pause of %s's tag checks: %s", self.registry, exc.strerror)
            return None
        return Pause.decode(data) if len(data) <= _STATE_MAX else None

    def _store(self, pause: Pause | None) -> None:
        if self._path is None:
            self._pause = pause
            return
        try:
            if pause is None:
                os.unlink(self._path)
            else:
                write_atomic(self._path, pause.encode())
        except FileNotFoundError:
            pass
        except OSError as exc:
            # The pause is an optimisation: without it, tag checks go on.
            log.warning("cannot write the pause of %s's tag checks: %s", self.registry, exc.strerror)


def _first(*candidates: float | None) -> float:
    return next(value for value in candidates if value is not None)


def parse_count(value: str | None) -> tuple[int | None, float | None]:
    """``76;w=21600`` as (76, 21600.0); a part that does not parse is None.

    A header sent twice arrives joined with a comma; the first is read.
    """
    if value is None:
        return None, None
    first, *params = value.split(",", 1)[0].split(";")
    count = _COUNT.fullmatch(first)
    window = None
    for param in params:
        if match := _WINDOW.fullmatch(param):
            window = float(match.group(1))
            break
    return (int(count.group(1)) if count else None), window


def parse_reset(value: str | None, now: float) -> float | None:
    """Seconds until the window resets, from ``ratelimit-reset`` (seconds, or a Unix time)."""
    if value is None:
        return None
    match = _COUNT.fullmatch(value.split(",", 1)[0])
    if match is None:
        return None
    number = int(match.group(1))
    return max(0.0, number - now) if number > _EPOCH_RESET else float(number)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait, from ``Retry-After`` (seconds, or an HTTP date); None when it does not parse."""
    if value is None:
        return None
    if match := _COUNT.fullmatch(value):
        return float(match.group(1))
    if len(value) > 64:
        return None
    try:
        moment = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        # RFC 9110 dates are in GMT; one marked -0000 comes back without a zone.
        moment = moment.replace(tzinfo=datetime.UTC)
    try:
        return max(0.0, moment.timestamp() - now)
    except (OverflowError, OSError, ValueError):
        return None
