"""A node's whole inventory, announced in batches.

A node that holds millions of digests cannot announce them in one message
(gRPC's default limit of 4 MiB holds about 38,000) nor in one call within
its deadline. It sends them in batches under one batch id instead, and the
coordinator applies each batch at once, as an ``AddContent`` of those
digests (``Locations.add``), so every call is short. The batch marked last
ends the announcement: the node's entries that it no longer holds are
removed, as a one-message announcement removes them
(``Locations.announce``), and the evictions that were pending for the node
are done with (each batch already answered those of its own digests).

Which entries go: those in ``held:<node>`` that were not registered since
the announcement began. The first batch creates ``announcing:<node>``, and
while it exists every registration for the node notes its digest there:
the batches themselves, and the node's other workers completing fetches or
adding content meanwhile (the scripts of ``locations`` and ``fetches``).
What the node fetched while it was announcing therefore stays, although
the listing of its store was made before it arrived::

    node:  list store ─ batch 1 ─── batch 2 ──── batch 3 (last) ─ (last) ─ (last)
    coord:              note 1      note 2  ┊    note 3; sweep    sweep    sweep: done
    other worker of the node:  CompleteFetch X (noted: kept)

The end never blocks Redis nor outlasts a call's deadline, however large
the inventory: it walks ``held:<node>`` with SSCAN, ``SWEEP_STEP`` digests
per script, for at most ``SWEEP_BUDGET`` seconds per call, keeping its
cursor in ``announcing-cursor:<node>``, and answers ``more`` until it got
round; the node then calls again (the last batch, with no content) until
it is done. SSCAN returns every member that was there for the whole walk
at least once, and a member dropped twice is dropped once.

Each batch also counts as a heartbeat of the node (``Membership.keep_alive``):
the node heartbeats from the loop that announces, so without it an
announcement longer than the membership's lifetime would see the node
dropped, with everything registered so far, and announce again for ever.

Every call may be retried (the node's client fails over on a deadline): a
batch registers the same content again, the end carries on from its
cursor, and a call for an announcement that ended already changes nothing
(``announced:<node>:<batch id>``). A batch with a new id starts afresh; an
announcement whose batches stop coming is forgotten ``IDLE_MS`` after its
latest call (what its batches registered stays registered).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from coordinator.digests import check_name
from coordinator.keys import Keys
from coordinator.leases import check_token
from coordinator.locations import ContentInfo, Locations
from coordinator.membership import Membership
from coordinator.redis_client import text, texts

# An announcement without a call for this long is forgotten.
IDLE_MS = 10 * 60 * 1000
# Digests of held:<node> the end looks at per step (SSCAN's COUNT).
SWEEP_STEP = 1000
# Seconds one call spends on the end before it answers ``more``.
SWEEP_BUDGET = 0.25

# KEYS[1] announcing-id:<node>, KEYS[2] announcing:<node>,
# KEYS[3] announcing-cursor:<node>, KEYS[4] announced:<node>:<batch id>
# ARGV[1] batch id, ARGV[2] how long the announcement lives without a call (ms)
# Returns 1, changing nothing, when the announcement ended already (this is
# a retry). Otherwise begins it when another one (or none) is in progress:
# the noted digests start empty but for the member '' (never a digest, so
# that the set exists), and the end's cursor at 0. Pushes the expiry of the
# three keys forward either way. Returns 0.
_BEGIN = """
if redis.call('EXISTS', KEYS[4]) == 1 then
  return 1
end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  redis.call('UNLINK', KEYS[2])
  redis.call('SET', KEYS[3], '0')
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('SADD', KEYS[2], '')
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return 0
"""


@dataclass(frozen=True)
class BatchAnswer:
    """The batch's digests the node must delete (expired), and whether the end needs another call."""

    evict: list[str]
    more: bool = False


class BatchedInventory:
    """Applies the batches of inventory announcements (the module docstring says how)."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        locations: Locations,
        membership: Membership,
        *,
        idle_ms: int = IDLE_MS,
        sweep_budget: float = SWEEP_BUDGET,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = client
        self._keys = keys
        self._locations = locations
        self._membership = membership
        self._idle_ms = idle_ms
        self._sweep_budget = sweep_budget
        self._clock = clock
        self._begin = client.register_script(_BEGIN)

    def announce(
        self, node_id: str, batch_id: str, content: Sequence[ContentInfo], ttl_ms: int | None, last: bool
    ) -> BatchAnswer:
        """Register one batch of ``node_id``'s inventory; with ``last``, end the announcement.

        ``evict`` lists the batch's digests the node must delete because
        they expired (as ``Locations.add``); ``more`` asks for another call
        (the last batch again, without content) to finish the end.
        ``ttl_ms`` as in ``Locations.announce``.
        """
        check_name(node_id, "node_id")
        check_token(batch_id, "batch_id")
        keys = self._keys
        ended = keys.announced(node_id, batch_id)
        begin_keys = [keys.announcing_id(node_id), keys.announcing(node_id), keys.announcing_cursor(node_id), ended]
        if int(self._begin(keys=begin_keys, args=[batch_id, self._idle_ms])):
            # A retry of a call whose first try ended the announcement.
            return BatchAnswer([])
        # The node's heartbeats wait for its announcement to end.
        self._membership.keep_alive(node_id)
        evict = self._locations.add(node_id, content, ttl_ms)
        if not last:
            return BatchAnswer(evict)
        if not self._sweep(node_id):
            return BatchAnswer(evict, more=True)
        self._locations.discard_pending(node_id)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.unlink(keys.announcing(node_id))
            pipe.delete(keys.announcing_id(node_id), keys.announcing_cursor(node_id))
            pipe.set(ended, 1, px=self._idle_ms)
            pipe.execute()
        return BatchAnswer(evict)

    def _sweep(self, node_id: str) -> bool:
        """Drop the node's entries not noted since the announcement began, from the stored cursor on.

        Returns True once the walk over ``held:<node>`` got round, False
        when the time budget ran out first (the cursor is kept).
        """
        held, cursor_key = self._keys.held(node_id), self._keys.announcing_cursor(node_id)
        stored = self._redis.get(cursor_key)
        cursor = int(text(stored)) if stored is not None else 0
        deadline = self._clock() + self._sweep_budget
        while True:
            cursor, members = self._redis.sscan(held, cursor, count=SWEEP_STEP)
            self._locations.drop_unnoted(node_id, texts(members))
            if cursor == 0:
                return True
            self._redis.set(cursor_key, cursor, px=self._idle_ms)
            if self._clock() >= deadline:
                return False
