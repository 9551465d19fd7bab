"""The location directory: which nodes hold which content, and what it is.

``loc:<digest>`` is the set of nodes holding the complete content,
``held:<node>`` the reverse (so replacing a node's inventory, or forgetting a
dead node, touches only that node's digests), and ``meta:<digest>`` the
content's size, media type, first-cached time and TTL. A location is only
ever added together with its reverse entry, its meta and its schedule entry,
in one script. Readers get only live holders: a node whose membership
expired is hidden at once, before the leader's sweep removes its entries.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import redis
from redis.typing import EncodableT

from coordinator.digests import check_digest, check_digests, check_name
from coordinator.distinct_bytes import META_FUNCTIONS
from coordinator.errors import InvalidArgument
from coordinator.keys import Keys
from coordinator.leases import Lease, Leases, parse_value
from coordinator.membership import Membership
from coordinator.redis_client import text, text_map, texts
from protos.values import Holder

# Digests handled per script; each chunk is one atomic step (see announce).
CHUNK = 500

# KEYS[1] the nodes set, KEYS[2] held:<node>, KEYS[3] the ttl schedule,
# KEYS[4] metrics:cluster, KEYS[5] announcing:<node>,
# then for each digest i: KEYS[4 + 2i] loc:<digest>, KEYS[5 + 2i] meta:<digest>
# ARGV[1] node id, ARGV[2] now (Unix ms), ARGV[3] TTL (ms) for content not
# scheduled yet, 0 = never; then five per digest i, from ARGV[4 + 5(i-1)]:
# digest, size, media type, accessed at (Unix ms; 0 or a future time = now),
# pending eviction (1/0)
# Registers announced content, or reports it expired. Content is expired when
# an eviction was already pending for the node, when its schedule entry is due,
# or, when it has no schedule entry (Redis lost its data, or the entry was
# swept while the node was away), when accessed_at + TTL has passed. Content
# that lives is scheduled if it was not; when it was, a given accessed_at
# pushes its expiry as a touch at that time would, and an announcement
# without one leaves the expiry alone. Content new to the cluster adds its
# size to the distinct bytes cached, content forgotten here subtracts it (see
# distinct_bytes). While the node announces its inventory in batches
# (KEYS[5] exists), registered digests are noted there (see inventory).
# Returns the expired digests.
_ANNOUNCE = (
    META_FUNCTIONS
    + """
local node, now, default_ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local held, schedule, cluster = KEYS[2], KEYS[3], KEYS[4]
local announcing = redis.call('EXISTS', KEYS[5]) == 1
local evict = {}
redis.call('SADD', KEYS[1], node)
for i = 1, (#KEYS - 5) / 2 do
  local loc, meta = KEYS[4 + 2 * i], KEYS[5 + 2 * i]
  local base = 3 + 5 * (i - 1)
  local digest, size, media_type = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  local accessed = math.min(tonumber(ARGV[base + 4]), now)
  local accessed_known = accessed > 0
  if not accessed_known then
    accessed = now
  end
  local expired = ARGV[base + 5] == '1'
  if not expired then
    local score = redis.call('ZSCORE', schedule, digest)
    local ttl = redis.call('HGET', meta, 'ttl_ms')
    if score then
      if tonumber(score) <= now then
        expired = true
      elseif accessed_known and ttl and tonumber(ttl) > 0 then
        redis.call('ZADD', schedule, 'XX', 'GT', accessed + tonumber(ttl), digest)
      end
    else
      ttl = ttl and tonumber(ttl) or default_ttl
      if ttl > 0 then
        if accessed + ttl <= now then
          expired = true
        else
          redis.call('ZADD', schedule, accessed + ttl, digest)
        end
      end
      if not expired then
        redis.call('HSET', meta, 'ttl_ms', ttl)
      end
    end
  end
  if expired then
    redis.call('SREM', loc, node)
    redis.call('SREM', held, digest)
    if redis.call('SCARD', loc) == 0 and not redis.call('ZSCORE', schedule, digest) then
      meta_delete(meta, cluster)
    end
    evict[#evict + 1] = digest
  else
    redis.call('SADD', loc, node)
    redis.call('SADD', held, digest)
    if announcing then
      redis.call('SADD', KEYS[5], digest)
    end
    if size ~= '0' and redis.call('HEXISTS', meta, 'size') == 0 then
      meta_set_size(meta, cluster, size)
    end
    if media_type ~= '' and (redis.call('HGET', meta, 'media_type') or '') == '' then
      redis.call('HSET', meta, 'media_type', media_type)
    end
    meta_created(meta, cluster, ARGV[2])
  end
end
return evict
"""
)

# KEYS[1] held:<node>, KEYS[2] the ttl schedule, KEYS[3] metrics:cluster,
# KEYS[4] announcing:<node>,
# then for each digest i: KEYS[3 + 2i] loc:<digest>, KEYS[4 + 2i] meta:<digest>
# ARGV[1] node id, ARGV[2] '1' to keep the digests noted in KEYS[4] (the end
# of a batched announcement), '0' to drop them all; ARGV[2 + i] digest i
# Removes the node from the digests' locations. Content whose last holder
# dropped it is gone from the cluster: its meta and schedule entry go too,
# and its size leaves the distinct bytes cached. Returns how many of the
# digests the node was registered for (and is no longer).
_DROP = (
    META_FUNCTIONS
    + """
local node, keep_noted, removed = ARGV[1], ARGV[2] == '1', 0
for i = 1, (#KEYS - 4) / 2 do
  local loc, meta, digest = KEYS[3 + 2 * i], KEYS[4 + 2 * i], ARGV[2 + i]
  if not (keep_noted and redis.call('SISMEMBER', KEYS[4], digest) == 1) then
    redis.call('SREM', KEYS[1], digest)
    if redis.call('SREM', loc, node) == 1 then
      removed = removed + 1
      if redis.call('SCARD', loc) == 0 then
        meta_delete(meta, KEYS[3])
        redis.call('ZREM', KEYS[2], digest)
      end
    end
  end
end
return removed
"""
)

# KEYS[1] evict:<node>
# Takes every pending eviction of the node at once; an announce delivers
# them in its answer instead of the next heartbeat.
_TAKE_PENDING = """
local pending = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
return pending
"""


@dataclass(frozen=True)
class ContentInfo:
    """What the directory knows about content, or what a node announces.

    ``accessed_at`` (Unix seconds, 0 = unknown) is only read from
    announcements; ``ttl_ms`` and ``first_cached`` only come from the
    directory (ttl_ms 0 = never expires).
    """

    digest: str
    size: int = 0
    media_type: str = ""
    accessed_at: float = 0.0
    ttl_ms: int = 0
    first_cached: float = 0.0


@dataclass(frozen=True)
class Location:
    """Who holds a digest completely, who fetches it now, and what it is."""

    holders: list[Holder]
    fetcher: Holder | None
    fetching: bool
    content: ContentInfo | None
    # Why the latest fetch under the lease key was given up, if it was (``Leases.release``).
    failure: str = ""


@dataclass(frozen=True)
class Claimed:
    """A claim's answer: live holders to copy from, or the lease (granted, or held by ``fetcher``)."""

    holders: list[Holder]
    # None when holders are listed: nothing was granted.
    lease: Lease | None
    fetcher: Holder | None = None


def to_ms(seconds: float) -> int:
    return round(seconds * 1000)


def chunked(items: Sequence[str], size: int = CHUNK) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Locations:
    """Registers, removes and looks up content locations."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        membership: Membership,
        leases: Leases,
        default_ttl: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        self._keys = keys
        self._membership = membership
        self._leases = leases
        self._default_ttl_ms = to_ms(default_ttl)
        self._clock = clock
        self._announce = client.register_script(_ANNOUNCE)
        self._drop = client.register_script(_DROP)
        self._take_pending = client.register_script(_TAKE_PENDING)

    def announce(self, node_id: str, content: Iterable[ContentInfo], ttl_ms: int | None = None) -> list[str]:
        """Replace everything the directory says ``node_id`` holds with ``content``.

        Returns the announced digests the node must delete because they
        expired; those are not registered. ``ttl_ms`` is the TTL of content
        not scheduled yet (None: the coordinator's default_ttl, 0: never).
        Evictions pending for the node are delivered here, in the answer.

        Each chunk of digests is one atomic step, so Redis is never blocked
        by a large inventory; in between, a reader may see part of the old
        inventory and part of the new, but never a location without its meta
        and schedule entry.
        """
        check_name(node_id, "node_id")
        announced = _checked(content)
        default_ms = self._ttl_ms(ttl_ms)
        pending = set(texts(self._take_pending(keys=[self._keys.evict(node_id)])))
        gone = sorted(set(texts(self._redis.smembers(self._keys.held(node_id)))) - set(announced))
        self._drop_chunks(node_id, gone)
        return self._register(node_id, announced, default_ms, pending)

    def add(self, node_id: str, content: Iterable[ContentInfo], ttl_ms: int | None = None) -> list[str]:
        """Register ``content`` as held by ``node_id`` too, replacing nothing; return the expired digests.

        For content a node got without a lease of its own (from a peer, or
        while the coordinator was unreachable). Content with an eviction
        pending for the node counts as expired; the eviction stays queued.
        """
        check_name(node_id, "node_id")
        added = _checked(content)
        default_ms = self._ttl_ms(ttl_ms)
        pending = set(texts(self._redis.lrange(self._keys.evict(node_id), 0, -1))) & set(added)
        return self._register(node_id, added, default_ms, pending)

    def _ttl_ms(self, ttl_ms: int | None) -> int:
        if ttl_ms is None:
            return self._default_ttl_ms
        if ttl_ms < 0:
            raise InvalidArgument("ttl_ms: must not be negative")
        return ttl_ms

    def _register(
        self, node_id: str, announced: dict[str, ContentInfo], default_ms: int, pending: set[str]
    ) -> list[str]:
        now_ms = to_ms(self._clock())
        evict: list[str] = []
        for chunk in chunked(list(announced)):
            keys = [
                self._keys.nodes(),
                self._keys.held(node_id),
                self._keys.ttl(),
                self._keys.metrics_cluster(),
                self._keys.announcing(node_id),
            ]
            args: list[EncodableT] = [node_id, now_ms, default_ms]
            for digest in chunk:
                item = announced[digest]
                keys += [self._keys.loc(digest), self._keys.meta(digest)]
                args += [digest, item.size, item.media_type, to_ms(item.accessed_at), int(digest in pending)]
            evict += texts(self._announce(keys=keys, args=args))
        return evict

    def discard_pending(self, node_id: str) -> None:
        """Forget the evictions pending for ``node_id`` (an announcement that replaced its entries ended)."""
        check_name(node_id, "node_id")
        self._take_pending(keys=[self._keys.evict(node_id)])

    def drop(self, node_id: str, digests: Iterable[str]) -> None:
        """The node no longer holds ``digests``; content nobody holds any more is forgotten."""
        check_name(node_id, "node_id")
        self._drop_chunks(node_id, check_digests(digests))

    def report_bad_copy(self, reporter_id: str, holder_id: str, digest: str) -> bool:
        """``reporter_id`` received bytes from ``holder_id`` that do not match ``digest``: unlist that copy.

        Removes exactly one registration, the holder's for this digest, as
        if the holder had dropped it (``drop``); every other holder, and the
        holder's other content and membership, stay. Only a live member may
        report, and not about itself (it drops its own content with
        ``drop``). Returns whether the holder was registered for the digest.
        """
        check_name(reporter_id, "node_id")
        check_name(holder_id, "holder_id")
        check_digest(digest)
        if reporter_id == holder_id:
            raise InvalidArgument("holder_id: a node reports another node's copy, not its own")
        if not self._membership.live([reporter_id]):
            raise InvalidArgument("node_id: only a live member of the cluster may report a copy")
        return self._drop_chunks(holder_id, [digest]) == 1

    def locate(self, digest: str, lease_key: str = "") -> Location:
        """Live holders of ``digest``, the live holder of ``lease_key``'s lease, and the content's meta.

        Also, when nobody holds that lease, the failure its latest holder gave it up with.
        """
        check_digest(digest)
        if lease_key:
            check_name(lease_key, "key")
        pipe = self._redis.pipeline(transaction=False)
        pipe.smembers(self._keys.loc(digest))
        pipe.hgetall(self._keys.meta(digest))
        if lease_key:
            pipe.get(self._keys.lock(lease_key))
            pipe.get(self._keys.failed(lease_key))
        replies = pipe.execute()
        holder_ids, meta = texts(replies[0]), text_map(replies[1])
        lease = parse_value(text(replies[2])) if lease_key and replies[2] is not None else None
        lease_holder = lease[2] if lease is not None else None
        urls = self._membership.urls([*sorted(holder_ids), *([lease_holder] if lease_holder else [])])
        holders = [Holder(node_id, urls[node_id]) for node_id in sorted(holder_ids) if node_id in urls]
        fetcher = Holder(lease_holder, urls[lease_holder]) if lease_holder and lease_holder in urls else None
        return Location(
            holders=holders,
            fetcher=fetcher,
            fetching=lease is not None,
            content=_content(digest, meta) if meta else None,
            failure=text(replies[3]) if lease_key and lease is None and replies[3] is not None else "",
        )

    def claim(self, digest: str, key: str, node_id: str, ttl_ms: int, token: str = "") -> Claimed:
        """Live holders of ``digest`` if any; else the lease on ``key``, granted unless another node holds it.

        Locating and granting are one atomic step while no node is
        registered for the digest. When nodes are registered but none of
        them is alive, the lease is acquired on its own, and given back if
        a live holder turned up meanwhile.
        """
        check_digest(digest)
        claimed = self._leases.claim(key, node_id, ttl_ms, token, self._keys.loc(digest))
        if isinstance(claimed, Lease):
            return self._claimed_lease(claimed)
        holders = self._live_holders(claimed)
        if holders:
            return Claimed(holders, None)
        lease = self._leases.acquire(key, node_id, ttl_ms, token)
        if lease.granted:
            holders = self._live_holders(texts(self._redis.smembers(self._keys.loc(digest))))
            if holders:
                self._leases.release(key, lease.token)
                return Claimed(holders, None)
        return self._claimed_lease(lease)

    def _claimed_lease(self, lease: Lease) -> Claimed:
        if lease.granted:
            return Claimed([], lease)
        url = self._membership.urls([lease.holder]).get(lease.holder, "")
        return Claimed([], lease, Holder(lease.holder, url))

    def _live_holders(self, node_ids: list[str]) -> list[Holder]:
        return [Holder(node_id, url) for node_id, url in self._membership.urls(sorted(node_ids)).items()]

    def holders(self, digest: str) -> set[str]:
        """Every node registered for ``digest``, alive or not (for tests and diagnostics)."""
        return set(texts(self._redis.smembers(self._keys.loc(check_digest(digest)))))

    def held(self, node_id: str) -> set[str]:
        """Every digest registered for ``node_id``."""
        return set(texts(self._redis.smembers(self._keys.held(node_id))))

    def content(self, digest: str) -> ContentInfo | None:
        """The directory's meta for ``digest``, or None."""
        meta = text_map(self._redis.hgetall(self._keys.meta(check_digest(digest))))
        return _content(digest, meta) if meta else None

    def drop_unnoted(self, node_id: str, digests: Sequence[str]) -> int:
        """Drop those of ``digests`` not registered since the node's batched announcement began.

        For the end of that announcement (``coordinator.inventory``); returns how many it was registered for.
        """
        check_name(node_id, "node_id")
        return self._drop_chunks(node_id, digests, keep_noted=True)

    def _drop_chunks(self, node_id: str, digests: Sequence[str], keep_noted: bool = False) -> int:
        """Drop ``digests`` from ``node_id``'s registrations; return how many it was registered for."""
        removed = 0
        for chunk in chunked(digests):
            keys = [
                self._keys.held(node_id),
                self._keys.ttl(),
                self._keys.metrics_cluster(),
                self._keys.announcing(node_id),
            ]
            for digest in chunk:
                keys += [self._keys.loc(digest), self._keys.meta(digest)]
            removed += int(self._drop(keys=keys, args=[node_id, int(keep_noted), *chunk]))
        return removed


def _checked(content: Iterable[ContentInfo]) -> dict[str, ContentInfo]:
    checked: dict[str, ContentInfo] = {}
    for item in content:
        check_digest(item.digest, "content.digest")
        if item.size < 0 or item.accessed_at < 0:
            raise InvalidArgument("content: size and accessed_at must not be negative")
        checked[item.digest] = item
    return checked


def _content(digest: str, meta: dict[str, str]) -> ContentInfo:
    return ContentInfo(
        digest=digest,
        size=int(meta.get("size", 0)),
        media_type=meta.get("media_type", ""),
        ttl_ms=int(meta.get("ttl_ms", 0)),
        first_cached=int(meta.get("first_cached", 0)) / 1000,
    )
