"""Completing a fetch: register the content and release its lease, in one step.

This is where fencing pays off. The script first checks that the caller
still holds the lease; a holder whose lease expired (and may have been
granted to another node since) gets ``LeaseLost`` and registers nothing,
so the directory never points at content written by a fetch the cluster
had already given up on.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
from redis.typing import EncodableT

from coordinator.digests import check_digest, check_name
from coordinator.distinct_bytes import META_FUNCTIONS
from coordinator.errors import InvalidArgument, LeaseLost
from coordinator.keys import Keys
from coordinator.leases import OWNS_LEASE
from coordinator.locations import ContentInfo, to_ms

# KEYS[1] lock:<lease key>, KEYS[2] the nodes set, KEYS[3] held:<node>,
# KEYS[4] the ttl schedule, KEYS[5] loc:<digest>, KEYS[6] meta:<digest>,
# KEYS[7] metrics:cluster, KEYS[8] announcing:<node>
# ARGV[1] token, ARGV[2] node id, ARGV[3] digest, ARGV[4] size, ARGV[5] media type,
# ARGV[6] now (Unix ms), ARGV[7] TTL (ms; 0 = never)
# Registers the node as a holder, records the meta, schedules the expiry and
# deletes the lease, when the token still holds it. When content is fetched
# again under different TTLs (two upstreams sharing a blob), the longest
# wins and "never" beats everything; a new expiry never shortens the
# scheduled one. Content new to the cluster adds its size to the distinct
# bytes cached (see distinct_bytes). While the node announces its inventory
# in batches (KEYS[8] exists), the digest is noted there, so that the end of
# the announcement keeps it (see inventory). Returns 1 when registered, 2 when the
# lease is gone but the node is a holder already (a retry of a call that
# succeeded), 0 when the lease was lost.
_COMPLETE = (
    OWNS_LEASE
    + META_FUNCTIONS
    + """
local node, digest, now = ARGV[2], ARGV[3], tonumber(ARGV[6])
if not owns(redis.call('GET', KEYS[1]), ARGV[1]) then
  if redis.call('SISMEMBER', KEYS[5], node) == 1 then
    return 2
  end
  return 0
end
redis.call('SADD', KEYS[2], node)
redis.call('SADD', KEYS[3], digest)
if redis.call('EXISTS', KEYS[8]) == 1 then
  redis.call('SADD', KEYS[8], digest)
end
redis.call('SADD', KEYS[5], node)
meta_set_size(KEYS[6], KEYS[7], ARGV[4])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[6], 'media_type', ARGV[5])
end
meta_created(KEYS[6], KEYS[7], ARGV[6])
local ttl = tonumber(ARGV[7])
local old = redis.call('HGET', KEYS[6], 'ttl_ms')
if old then
  old = tonumber(old)
  if old == 0 or (ttl ~= 0 and old > ttl) then
    ttl = old
  end
end
redis.call('HSET', KEYS[6], 'ttl_ms', ttl)
if ttl == 0 then
  redis.call('ZREM', KEYS[4], digest)
else
  redis.call('ZADD', KEYS[4], 'GT', now + ttl, digest)
end
redis.call('DEL', KEYS[1])
return 1
"""
)


class Fetches:
    """Turns a finished fetch into a location, fenced by the fetch's lease."""

    def __init__(self, client: redis.Redis, keys: Keys, clock: Callable[[], float] = time.time) -> None:
        self._keys = keys
        self._clock = clock
        self._complete = client.register_script(_COMPLETE)

    def complete(self, key: str, token: str, node_id: str, content: ContentInfo, ttl_ms: int) -> None:
        """Register ``content`` as held by ``node_id`` and release the lease on ``key``.

        ``ttl_ms`` 0 means the content never expires. Raises ``LeaseLost``
        when ``token`` no longer holds the lease.
        """
        check_name(key, "key")
        check_name(node_id, "node_id")
        digest = check_digest(content.digest, "content.digest")
        if content.size < 0 or ttl_ms < 0:
            raise InvalidArgument("content.size and ttl_ms must not be negative")
        keys = [
            self._keys.lock(key),
            self._keys.nodes(),
            self._keys.held(node_id),
            self._keys.ttl(),
            self._keys.loc(digest),
            self._keys.meta(digest),
            self._keys.metrics_cluster(),
            self._keys.announcing(node_id),
        ]
        args: list[EncodableT] = [
            token,
            node_id,
            digest,
            content.size,
            content.media_type,
            to_ms(self._clock()),
            ttl_ms,
        ]
        if not token or not int(self._complete(keys=keys, args=args)):
            raise LeaseLost(f"the lease on {key} is no longer held under this token")
