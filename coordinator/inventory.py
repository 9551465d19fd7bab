"""A node's whole inventory, announced in batches.

A node that holds millions of digests cannot announce them in one message
(gRPC's default limit of 4 MiB holds about 38,000) nor in one call within
its deadline. It sends them in batches under one batch id instead, and the
coordinator applies each batch at once, as an ``AddContent`` of those
digests (``Locations.add``), so every call is short. The batch marked last
ends the announcement: the node's entries that were there when the
announcement began and that no batch named are removed, as a one-message
announcement removes them (``Locations.announce``), and the evictions that
were pending for the node are done with (each batch already answered those
of its own digests).

Comparing with the entries held *when the announcement began* (a copy of
``held:<node>`` taken by its first batch) rather than at its end keeps the
content the node fetched while it was announcing, which its ``CompleteFetch``
registered, in the directory, although the node's listing of its store was
made before it arrived.

As a timeline::

    node:  list store ─ batch 1 ──── batch 2 ─────── batch 3 (last)
    coord:              copy held;   register 2 ┊    register 3; remove
                        register 1              ┊    (copy - named)
    other worker of the node:         CompleteFetch X (not in the copy: kept)

Each batch also counts as a heartbeat of the node (``Membership.keep_alive``):
the node heartbeats from the loop that announces, so without it an
announcement longer than the membership's lifetime would see the node
dropped, with everything registered so far, and announce again for ever.

Every call may be retried (the node's client fails over on a deadline): a
batch registers the same content again, and the last batch of an
announcement that ended already changes nothing. A batch with a new id
starts afresh; an announcement whose batches stop
coming is forgotten ``IDLE_MS`` after its latest batch (what its batches
registered stays registered).
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from coordinator.digests import check_name
from coordinator.keys import Keys
from coordinator.leases import check_token
from coordinator.locations import CHUNK, ContentInfo, Locations, chunked
from coordinator.membership import Membership
from coordinator.redis_client import texts

# An announcement without a batch for this long is forgotten.
IDLE_MS = 10 * 60 * 1000

# KEYS[1] held:<node>, KEYS[2] announced-before:<node>:<batch id>,
# KEYS[3] announcing:<node>:<batch id>, KEYS[4] announced:<node>:<batch id>
# ARGV[1] how long the announcement lives without a batch (ms), then the
# digests the batch names
# Does nothing and returns 1 when the announcement ended already (KEYS[4]:
# this is a retry of its last batch). The first call of an announcement (KEYS[3] absent) copies the node's
# entries as they are now into KEYS[2]; every call adds its digests to
# KEYS[3], and the member '' (never a digest) that marks the announcement
# as begun even when no batch names a digest, and pushes both keys' expiry
# forward. Returns 0.
_STAGE = """
if redis.call('EXISTS', KEYS[4]) == 1 then
  return 1
end
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('DEL', KEYS[2])
  redis.call('COPY', KEYS[1], KEYS[2])
end
redis.call('SADD', KEYS[3], '')
for i = 2, #ARGV do
  redis.call('SADD', KEYS[3], ARGV[i])
end
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[1])
return 0
"""


class BatchedInventory:
    """Applies the batches of inventory announcements (the module docstring says how)."""

    def __init__(
        self, client: redis.Redis, keys: Keys, locations: Locations, membership: Membership, idle_ms: int = IDLE_MS
    ) -> None:
        self._redis = client
        self._keys = keys
        self._locations = locations
        self._membership = membership
        self._idle_ms = idle_ms
        self._stage = client.register_script(_STAGE)

    def announce(
        self, node_id: str, batch_id: str, content: Sequence[ContentInfo], ttl_ms: int | None, last: bool
    ) -> list[str]:
        """Register one batch of ``node_id``'s inventory; with ``last``, end the announcement.

        Returns the batch's digests the node must delete because they
        expired (as ``Locations.add``). ``ttl_ms`` as in ``Locations.announce``.
        """
        check_name(node_id, "node_id")
        check_token(batch_id, "batch_id")
        # The node's heartbeats wait for its announcement to end.
        self._membership.keep_alive(node_id)
        evict = self._locations.add(node_id, content, ttl_ms)
        held = self._keys.held(node_id)
        before = self._keys.announced_before(node_id, batch_id)
        named = self._keys.announcing(node_id, batch_id)
        ended = self._keys.announced(node_id, batch_id)
        digests = [item.digest for item in content]
        for chunk in chunked(digests, CHUNK) if digests else [[]]:
            if int(self._stage(keys=[held, before, named, ended], args=[self._idle_ms, *chunk])):
                # A retry of the last batch, whose first try got through.
                return evict
        if last:
            gone = sorted(texts(self._redis.sdiff([before, named])))
            self._locations.drop(node_id, gone)
            self._locations.discard_pending(node_id)
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(before, named)
                pipe.set(ended, 1, px=self._idle_ms)
                pipe.execute()
        return evict
