"""Membership: which nodes are alive, and the cleanup after those that died.

A node is alive while its hash ``node:<id>`` exists. Register creates it and
heartbeats refresh it, both with a PX expiry of ``ttl``; Redis removes it when
the heartbeats stop, so liveness needs no clock here. The set ``nodes`` lists
every node that has state in Redis (a membership, held content, pending
evictions), so that ``drop_expired`` (run by the scheduler's leader) can
find the dead ones and remove all their locations.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis
from redis.typing import EncodableT, FieldT

from coordinator.digests import check_name
from coordinator.distinct_bytes import META_FUNCTIONS
from coordinator.errors import InvalidArgument
from coordinator.keys import Keys
from coordinator.redis_client import text_map, texts

# Digests handled per cleanup script: large enough that a typical node goes
# in one atomic step, small enough that one step never blocks Redis long.
CLEANUP_CHUNK = 1000
# Steps one cleanup may take before it leaves the rest to the next sweep; a
# bound in case something keeps adding to a dead node's inventory.
MAX_CLEANUP_STEPS = 1000

# KEYS[1] the node's hash node:<id>
# ARGV[1] url, ARGV[2] capacity bytes, ARGV[3] used bytes, ARGV[4] seen at (Unix seconds),
# ARGV[5] membership TTL (ms)
# Refreshes a membership that still exists and reports whether it did: a
# heartbeat never brings an expired node back, so the node learns it must
# register and announce its inventory again.
_HEARTBEAT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'url', ARGV[1], 'capacity_bytes', ARGV[2], 'used_bytes', ARGV[3], 'seen_at', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

# KEYS[1] the nodes set, KEYS[2] node:<id>, KEYS[3] held:<id>, KEYS[4] evict:<id>,
# KEYS[5] metrics:cluster,
# then for each digest i: KEYS[4 + 2i] loc:<digest>, KEYS[5 + 2i] meta:<digest>
# ARGV[1] the node id, ARGV[1 + i] digest i
# Removes a dead node from the locations of a chunk of the digests it held,
# and, once it holds nothing, forgets the node. A location left without
# holders keeps its meta and its schedule entry, so the node's content keeps
# its expiry when the node comes back and announces it; only content that
# never expires (ttl_ms 0) loses its meta, as no sweep would remove it,
# and with it its share of the distinct bytes cached (see distinct_bytes).
# Returns -1 when the node registered again meanwhile (nothing changed),
# 0 when it still holds digests (call again), 1 when it is forgotten.
_DROP_NODE = (
    META_FUNCTIONS
    + """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return -1
end
local node = ARGV[1]
for i = 1, (#KEYS - 5) / 2 do
  local loc, meta, digest = KEYS[4 + 2 * i], KEYS[5 + 2 * i], ARGV[1 + i]
  redis.call('SREM', loc, node)
  redis.call('SREM', KEYS[3], digest)
  if redis.call('SCARD', loc) == 0 and redis.call('HGET', meta, 'ttl_ms') == '0' then
    meta_delete(meta, KEYS[5])
  end
end
if redis.call('SCARD', KEYS[3]) > 0 then
  return 0
end
redis.call('SREM', KEYS[1], node)
redis.call('DEL', KEYS[4])
return 1
"""
)


@dataclass(frozen=True)
class NodeInfo:
    """A node as it describes itself: its id, peer URL and disk usage."""

    id: str
    url: str
    capacity_bytes: int = 0
    used_bytes: int = 0


class Membership:
    """Registers nodes, keeps them alive on heartbeats, and cleans up after dead ones."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self._redis = client
        self._keys = keys
        self._ttl_ms = max(1, round(ttl * 1000))
        self._clock = clock
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._drop_node = client.register_script(_DROP_NODE)

    @property
    def ttl_ms(self) -> int:
        return self._ttl_ms

    def register(self, node: NodeInfo) -> None:
        """Create or refresh the node's membership."""
        key = self._keys.node(node.id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(key, mapping=self._fields(node))
        pipe.pexpire(key, self._ttl_ms)
        pipe.sadd(self._keys.nodes(), node.id)
        pipe.execute()

    def heartbeat(self, node: NodeInfo) -> bool:
        """Refresh the membership; False when the node is unknown and must register again."""
        fields = self._fields(node)
        args = [fields["url"], fields["capacity_bytes"], fields["used_bytes"], fields["seen_at"], self._ttl_ms]
        return bool(self._heartbeat(keys=[self._keys.node(node.id)], args=args))

    def keep_alive(self, node_id: str) -> bool:
        """Refresh a membership that still exists, as a heartbeat does; False when it expired.

        For calls that prove the node alive while they keep it from its
        heartbeats: the batches of a long inventory announcement.
        """
        return bool(self._redis.pexpire(self._keys.node(check_name(node_id, "node_id")), self._ttl_ms))

    def get(self, node_id: str) -> NodeInfo | None:
        """The live node's registration, or None when it is not a member."""
        fields = text_map(self._redis.hgetall(self._keys.node(node_id)))
        if not fields:
            return None
        return NodeInfo(
            id=node_id,
            url=fields.get("url", ""),
            capacity_bytes=int(fields.get("capacity_bytes", 0)),
            used_bytes=int(fields.get("used_bytes", 0)),
        )

    def urls(self, node_ids: Iterable[str]) -> dict[str, str]:
        """The peer URL of each live node among ``node_ids``; dead ones are left out."""
        ids = list(dict.fromkeys(node_ids))
        if not ids:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for node_id in ids:
            pipe.hget(self._keys.node(node_id), "url")
        return {node_id: str(url) for node_id, url in zip(ids, pipe.execute(), strict=True) if url is not None}

    def live(self, node_ids: Iterable[str]) -> set[str]:
        """The ids among ``node_ids`` whose membership exists."""
        return set(self.urls(node_ids))

    def drop_expired(self) -> list[str]:
        """Forget every node whose membership expired, with all its locations; return their ids.

        Runs on the scheduler's leader. Each step is atomic and re-checks that
        the node is still dead, so a node that registers again in the middle
        keeps the locations not yet removed, and two coordinators running
        this at once only repeat each other's work.
        """
        known = sorted(texts(self._redis.smembers(self._keys.nodes())))
        alive = self.live(known)
        return [node_id for node_id in known if node_id not in alive and self._drop(node_id)]

    def _drop(self, node_id: str) -> bool:
        for _ in range(MAX_CLEANUP_STEPS):
            digests = texts(self._redis.srandmember(self._keys.held(node_id), CLEANUP_CHUNK) or [])
            keys = [
                self._keys.nodes(),
                self._keys.node(node_id),
                self._keys.held(node_id),
                self._keys.evict(node_id),
                self._keys.metrics_cluster(),
            ]
            for digest in digests:
                keys += [self._keys.loc(digest), self._keys.meta(digest)]
            result = int(self._drop_node(keys=keys, args=[node_id, *digests]))
            if result != 0:
                return result == 1
        return False

    def _fields(self, node: NodeInfo) -> dict[FieldT, EncodableT]:
        check_name(node.id, "node.id")
        check_name(node.url, "node.url")
        if node.capacity_bytes < 0 or node.used_bytes < 0:
            raise InvalidArgument("node: capacity_bytes and used_bytes must not be negative")
        return {
            "url": node.url,
            "capacity_bytes": str(node.capacity_bytes),
            "used_bytes": str(node.used_bytes),
            "seen_at": repr(float(self._clock())),
        }
