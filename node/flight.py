"""One upstream fetch per key for the whole cluster: the loop every miss goes through.

``Flight.coordinate`` is the only place a node takes a cluster-wide lease.
A miss of a blob, a manifest or a tag check is a short caller of it (see
``cluster_source.py``) that says how to *look* for the content elsewhere in
the cluster, and what to do with the turn it gets::

    look ──found──▶ FOUND: use what the look found (a peer's copy, a fresh tag pointer)
     │
     ▼
    acquire the lease ──granted──▶ look again ──found──▶ release the lease; FOUND
     │                                  │
     │ held by another node             ▼
     ▼                             GRANTED: fetch from the upstream under the lease
    follow the holder ──found──▶ FOUND         (renewed while the body runs)
     │
     ▼
    wait and loop, up to ``wait_timeout`` ──▶ WAITED_OUT: fetch anyway, unfenced

The second look closes a race, as a timeline::

    node A: look (nothing) ─────────────── acquire ─▶ granted
    node B: ... fetch ── CompleteFetch ─┘
                         (registers the location and releases the lease in
                          one step, so A's second look sees B's copy)

Without it A would fetch the content a second time.

A caller whose look starts with ``Locate`` passes a *claim* instead: one
``Claim`` call that locates and, when no node holds the content, takes the
lease in the same atomic step, so the second look is not needed. The
turn then costs one coordinator call before the fetch instead of three;
only when the holders it lists all fail does the loop fall back to
``AcquireLease`` and the second look.

Degraded mode is decided here and nowhere else: any ``CoordinatorError``
while looking or leasing (an outage, or a refused secret) gives the turn
``DEGRADED``, and the caller fetches from the upstream directly, with only
the node's own single flight; an error while announcing content marks the
node's inventory for re-announcement (``Announcements``); an error while
releasing a lease is ignored (the lease runs out on its own).

Leaving the ``coordinate`` block releases a lease still held. Content the
caller committed is announced with ``committed`` *before* the block is left:
the commit always comes before the announcement.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from node.coordinator_client import Coordinator, CoordinatorError, Lease, LeaseLost
from node.errors import ShoalError
from protos.metrics import DEGRADED
from protos.values import Content, Holder, TagPointer

log = logging.getLogger(__name__)

T = TypeVar("T")
# A claim: given the lease's TTL (ms), what the look found, and the lease
# when the coordinator answered with one (None: it listed holders instead).
Claimer = Callable[[int], tuple[T | None, Lease | None]]

# While another node holds a lease, look again this often.
POLL = 0.05
# A lease renewal that failed is tried again this soon (seconds).
RENEW_RETRY = 0.25


class Outcome(enum.Enum):
    FOUND = "found"  # a look found it elsewhere in the cluster; no lease is held
    GRANTED = "granted"  # this node holds the lease: it asks the upstream for the whole cluster
    WAITED_OUT = "waited out"  # another node's fetch did not end in time: fetch anyway, unfenced
    DEGRADED = "degraded"  # the coordinator is unusable: fetch directly, announce later


@dataclass
class Turn(Generic[T]):
    """What ``coordinate`` decided for one miss."""

    key: str
    outcome: Outcome
    found: T | None = None
    # The lease token, while GRANTED.
    token: str = ""
    # The holder has sent the call that ends its lease (CompleteFetch, or
    # PutTag with the release): the lease is not given back again on the way
    # out, and a renewal refused from then on is expected.
    settled: bool = False


class Counter(Protocol):
    def count(self, kind: str, counter: str, value: int = 1) -> None: ...


class Announcements:
    """A marker file: content arrived that the coordinator has not heard of.

    Any worker sets it; the worker on heartbeat duty announces the whole
    inventory when it finds the marker, and clears it.
    """

    def __init__(self, path: str) -> None:
        self._path = path

    def mark(self) -> None:
        open(self._path, "a").close()

    def pending(self) -> bool:
        return os.path.exists(self._path)

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)


class Flight:
    """The node's side of the cluster-wide single flight.

    ``lease_ttl`` and ``wait_timeout`` are seconds; ``clock`` is monotonic,
    and ``sleep`` is how the loop waits between looks.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        node_id: str,
        announcements: Announcements,
        counter: Counter,
        *,
        lease_ttl: float,
        wait_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.coordinator = coordinator
        self.node_id = node_id
        self.announcements = announcements
        self._counter = counter
        self._lease_ttl_ms = int(lease_ttl * 1000)
        self._wait_timeout = wait_timeout
        self._clock = clock
        self._sleep = sleep

    @contextlib.contextmanager
    def coordinate(
        self,
        key: str,
        look: Callable[[], T | None],
        follow: Callable[[Holder], T | None] | None = None,
        *,
        kind: str | None = None,
        claim: Claimer[T] | None = None,
    ) -> Iterator[Turn[T]]:
        """Decide who fetches ``key``; the block acts on the turn.

        ``look`` finds the content elsewhere in the cluster, or returns None;
        it may call the coordinator, and its ``CoordinatorError`` means
        degraded. ``follow``, when given, tries the node that holds the lease
        now (a fetch in progress there). ``kind`` (``blob``, ``manifest``)
        names the counter a wait for another node's lease adds to; a
        degraded turn counts under it, or under ``tag`` without one (only
        tag checks pass none). ``claim``, when given, is the look and the
        lease in one call (see the module docstring); ``look`` is then only
        the second look after an ``AcquireLease``.

        While the turn is GRANTED the lease is renewed; leaving the block
        releases it unless ``committed`` completed it, so an error in the
        block lets another node fetch at once. An error that holds for the
        whole cluster (``ShoalError.for_the_cluster``: the upstream too
        slow) is given with the release, so that the nodes following this
        fetch fail too rather than fetch again (``failure``).
        """
        turn = self._take_turn(key, look, follow, kind, claim)
        if turn.outcome is not Outcome.GRANTED:
            yield turn
            return
        renewer = _LeaseRenewer(
            self.coordinator, key, turn.token, self._lease_ttl_ms, self._clock, settled=lambda: turn.settled
        )
        renewer.start()
        failure = ""
        try:
            yield turn
        except ShoalError as exc:
            if exc.for_the_cluster:
                failure = exc.message
            raise
        finally:
            renewer.stop()
            if not turn.settled:
                self._release(turn, failure)

    def failure(self, key: str, digest: str) -> str:
        """Why the latest fetch under ``key`` was given up for the whole cluster, or empty.

        Asked by a node whose transfer from that fetch broke off, before it
        carries the transfer on. Empty when no coordinator answers.
        """
        try:
            return self.coordinator.locate(digest, key).failure
        except CoordinatorError:
            return ""

    def _take_turn(
        self,
        key: str,
        look: Callable[[], T | None],
        follow: Callable[[Holder], T | None] | None,
        kind: str | None,
        claim: Claimer[T] | None,
    ) -> Turn[T]:
        deadline = self._clock() + self._wait_timeout
        waited = False
        while True:
            try:
                found, lease = claim(self._lease_ttl_ms) if claim is not None else (look(), None)
                if found is not None:
                    return Turn(key, Outcome.FOUND, found)
                # A claim's lease was granted in the step that found no holder.
                claimed = lease is not None
                if lease is None:
                    lease = self.coordinator.acquire_lease(key, self._lease_ttl_ms)
            except CoordinatorError as exc:
                log.warning("coordinator unusable, going to the upstream directly for %s: %s", key, exc)
                self._counter.count(kind or "tag", DEGRADED)
                return Turn(key, Outcome.DEGRADED)
            if lease.granted:
                turn: Turn[T] = Turn(key, Outcome.GRANTED, token=lease.token)
                found = None if claimed else self._second_look(look)
                if found is None:
                    return turn
                self._release(turn)
                return Turn(key, Outcome.FOUND, found)
            holder = lease.holder
            if follow is not None and holder is not None and holder.url and holder.node_id != self.node_id:
                found = follow(holder)
                if found is not None:
                    return Turn(key, Outcome.FOUND, found)
            if not waited and kind is not None:
                waited = True
                self._counter.count(kind, "lease_waits")
            if self._clock() > deadline:
                log.warning("gave up waiting for the cluster's fetch of %s; fetching it myself", key)
                return Turn(key, Outcome.WAITED_OUT)
            self._sleep(POLL)

    def _second_look(self, look: Callable[[], T | None]) -> T | None:
        """After the grant, look once more (see the timeline in the module docstring)."""
        try:
            return look()
        except CoordinatorError:
            return None

    def _release(self, turn: Turn[T], failure: str = "") -> None:
        turn.settled = True
        with contextlib.suppress(CoordinatorError):
            self.coordinator.abort_fetch(turn.key, turn.token, failure)

    # After the caller's commit.

    def committed(self, turn: Turn[T], content: Content | None, ttl_ms: int) -> None:
        """Tell the cluster that this node now holds ``content`` (None: it is not in the store after all).

        GRANTED completes the lease, fenced by its token: the location is
        registered and the lease released in one step. Content that came
        without a lease is added. Degraded, the inventory is announced later.
        """
        if turn.outcome is Outcome.DEGRADED:
            self.announcements.mark()
            return
        if content is None:
            return
        try:
            if turn.outcome is Outcome.GRANTED:
                turn.settled = True
                self.coordinator.complete_fetch(
                    turn.key, turn.token, content.digest, content.size, content.media_type, ttl_ms
                )
            else:
                self.coordinator.add_content([content], ttl_ms=ttl_ms)
        except LeaseLost:
            # Another node took the lease over; the coordinator keeps its
            # registration. This copy is verified, and the next inventory
            # announcement registers it.
            log.warning("lease %s was taken over; %s is not registered now", turn.key, content.digest)
            self.announcements.mark()
        except CoordinatorError:
            self.announcements.mark()

    def share_tag(self, turn: Turn[T], registry: str, name: str, tag: str, pointer: TagPointer) -> None:
        """Share what the upstream said a tag points at, fenced by the tag's lease, and release the lease with it."""
        if turn.outcome is not Outcome.GRANTED:
            return
        turn.settled = True
        try:
            self.coordinator.put_tag(registry, name, tag, pointer, turn.token, release=True)
        except LeaseLost:
            log.warning("lost the lease on %s while checking it; not sharing the answer", turn.key)
        except CoordinatorError:
            pass


class _LeaseRenewer:
    """Keeps a lease alive while its holder works: a renewal every quarter of its lifetime.

    A lease is short (``cluster.lease_ttl``, 3 s by default) so that a
    holder that died leaves it behind for that long at most; a holder that
    is alive keeps it by renewing. A quarter leaves three quarters (2.25 s)
    for one renewal to get through: enough for a call whose first
    coordinator hangs for the whole call deadline (``cluster.timeout``,
    2 s) to be answered by the next one in time. A renewal that fails (no
    coordinator answered) is tried again after ``RENEW_RETRY`` rather than
    a quarter later, as long as the lease may still stand. Renewing stops when the
    coordinator says the lease is held under another token, or when it has
    run out by this renewer's count (``ttl`` after the last renewal that
    was confirmed, counted from when that call was sent, which is before the
    coordinator set the new expiry). The fetch goes on either way; fencing
    refuses its ``CompleteFetch`` if another node took the lease over, and
    its content is announced with the inventory instead. A renewal refused
    after the holder ended the lease itself (``settled``: a renewal sent
    while its ``CompleteFetch`` was on the way) stops renewing quietly.

    ``renew`` is one step, for tests with a fake clock; ``start`` runs the
    steps in a thread until ``stop``.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        key: str,
        token: str,
        ttl_ms: int,
        clock: Callable[[], float],
        settled: Callable[[], bool] = lambda: False,
    ) -> None:
        self._coordinator, self._key, self._token, self._ttl_ms = coordinator, key, token, ttl_ms
        self._clock, self._settled = clock, settled
        self.interval = ttl_ms / 4000
        self._retry = min(RENEW_RETRY, self.interval)
        # Granted just before this renewer was made.
        self.expires = clock() + ttl_ms / 1000
        self._failing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"renew-{key[:24]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def renew(self) -> float | None:
        """Renew the lease once; return the seconds until the next renewal, or None once it is lost."""
        sent = self._clock()
        if sent >= self.expires:
            log.warning("the lease %s ran out: no coordinator confirmed a renewal in time", self._key)
            return None
        try:
            renewed = self._coordinator.renew_lease(self._key, self._token, self._ttl_ms)
        except CoordinatorError as exc:
            if not self._failing:
                log.warning("could not renew the lease %s (trying again): %s", self._key, exc)
            self._failing = True
            return max(0.0, min(self._retry, self.expires - self._clock()))
        if not renewed:
            if not self._settled():
                log.warning("lost the lease %s during the fetch: another node holds it now", self._key)
            return None
        self._failing = False
        self.expires = sent + self._ttl_ms / 1000
        return self.interval

    def _run(self) -> None:
        delay: float | None = self.interval
        while delay is not None and not self._stop.wait(delay):
            delay = self.renew()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
