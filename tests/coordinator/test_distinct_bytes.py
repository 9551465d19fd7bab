"""Distinct bytes cached, against a real Redis, through every path that creates or deletes a meta.

After every step the counter must equal the sum of the sizes of the metas
that exist, which ``Parts.check`` recomputes from Redis itself.
"""

from __future__ import annotations

import pytest
import redis

from coordinator.errors import InvalidArgument
from coordinator.fetches import Fetches
from coordinator.keys import Keys
from coordinator.leases import Leases
from coordinator.locations import ContentInfo, Locations
from coordinator.membership import Membership, NodeInfo
from coordinator.metrics import Metrics
from coordinator.scheduler import Schedule
from protos.metrics import DISTINCT_BYTES
from testbed.clock import FakeClock
from testbed.redis_server import RedisServer
from tests.coordinator.digests import digest

HOUR = 3600.0
HOUR_MS = 3_600_000
LAYER = ContentInfo(digest("layer"), size=1234, media_type="application/vnd.oci.image.layer.v1.tar+gzip")


class Parts:
    """The collaborators that touch metas, on one Redis and one clock, with nodes a and b."""

    def __init__(self, client: redis.Redis, keys: Keys, clock: FakeClock) -> None:
        self.client, self.keys, self.clock = client, keys, clock
        self.membership = Membership(client, keys, 10.0, clock)
        self.leases = Leases(client, keys)
        self.locations = Locations(client, keys, self.membership, self.leases, default_ttl=HOUR, clock=clock)
        self.fetches = Fetches(client, keys, clock)
        self.schedule = Schedule(client, keys, clock)
        self.metrics = Metrics(client, keys, self.membership)
        self.register()

    def register(self) -> None:
        for name in ("a", "b"):
            self.membership.register(NodeInfo(f"node-{name}", f"http://{name}:5000"))

    def fetch(self, node_id: str, content: ContentInfo = LAYER, ttl_ms: int = HOUR_MS) -> None:
        key = f"blob:{content.digest}"
        lease = self.leases.acquire(key, node_id, 10_000)
        assert lease.granted
        self.fetches.complete(key, lease.token, node_id, content, ttl_ms)

    def distinct(self) -> int:
        """The counter, after checking it against the metas in Redis."""
        value = self.metrics.snapshot().cluster.get(DISTINCT_BYTES, 0)
        metas = self.client.scan_iter(match=f"{self.keys.prefix}meta:*", count=1000)
        expected = sum(int(self.client.hget(meta, "size") or 0) for meta in metas)
        assert value == expected, f"the counter says {value}, the metas in Redis add up to {expected}"
        return value


@pytest.fixture
def parts(redis_client: redis.Redis, keys: Keys, clock: FakeClock) -> Parts:
    return Parts(redis_client, keys, clock)


def test_fetch_copy_expire_refetch_and_rebuild_after_flushall(
    parts: Parts, redis_server: RedisServer, clock: FakeClock
) -> None:
    parts.fetch("node-a")
    assert parts.distinct() == LAYER.size

    # node-b copied it from node-a: the cluster holds nothing new.
    assert parts.locations.add("node-b", [LAYER]) == []
    assert parts.distinct() == LAYER.size
    # Neither does a second fetch of the same digest.
    parts.fetch("node-b")
    assert parts.distinct() == LAYER.size

    clock.advance(HOUR)
    assert parts.schedule.sweep() == [LAYER.digest]
    assert parts.distinct() == 0

    parts.fetch("node-a")
    assert parts.distinct() == LAYER.size

    # Redis lost everything; the nodes register and announce again.
    redis_server.flushall()
    assert parts.distinct() == 0
    parts.register()
    assert parts.locations.announce("node-a", [LAYER]) == []
    assert parts.locations.announce("node-b", [LAYER]) == []
    assert parts.distinct() == LAYER.size


def test_only_the_last_holder_dropping_content_subtracts_it(parts: Parts) -> None:
    other = ContentInfo(digest("other"), 10)
    parts.locations.announce("node-a", [LAYER, other])
    parts.locations.announce("node-b", [LAYER])
    assert parts.distinct() == LAYER.size + other.size

    parts.locations.drop("node-a", [LAYER.digest])
    assert parts.distinct() == LAYER.size + other.size
    parts.locations.drop("node-b", [LAYER.digest])
    assert parts.distinct() == other.size
    parts.locations.drop("node-b", [other.digest])  # node-b never held it.
    assert parts.distinct() == other.size

    # An announcement replaces node-a's inventory: "other" is dropped with it.
    parts.locations.announce("node-a", [])
    assert parts.distinct() == 0


def test_expired_announcements_and_pending_evictions_never_count(parts: Parts, clock: FakeClock) -> None:
    stale = ContentInfo(digest("stale"), 99, accessed_at=clock() - HOUR - 1)
    assert parts.locations.announce("node-a", [stale]) == [stale.digest]
    assert parts.distinct() == 0

    parts.locations.announce("node-a", [LAYER])
    clock.advance(HOUR)
    parts.schedule.sweep()
    assert parts.distinct() == 0
    assert parts.locations.add("node-a", [LAYER]) == [LAYER.digest], "the eviction is pending"
    assert parts.distinct() == 0


def test_a_size_learnt_later_is_counted_once(parts: Parts) -> None:
    parts.locations.announce("node-a", [ContentInfo(LAYER.digest, 0)])
    assert parts.distinct() == 0

    parts.locations.announce("node-b", [LAYER])
    assert parts.distinct() == LAYER.size
    parts.locations.announce("node-a", [ContentInfo(LAYER.digest, 5)])  # The first size known stays.
    assert parts.distinct() == LAYER.size
    parts.fetch("node-a", ContentInfo(LAYER.digest, 1000))  # A completed fetch knows best.
    assert parts.distinct() == 1000

    parts.locations.drop("node-a", [LAYER.digest])
    parts.locations.drop("node-b", [LAYER.digest])
    assert parts.distinct() == 0


def test_dead_nodes_content_counts_until_it_leaves_the_cluster(
    parts: Parts, redis_client: redis.Redis, keys: Keys, clock: FakeClock
) -> None:
    forever = ContentInfo(digest("forever"), 7)
    parts.locations.announce("node-a", [LAYER])
    parts.locations.add("node-a", [forever], ttl_ms=0)
    assert parts.distinct() == LAYER.size + forever.size

    redis_client.delete(keys.node("node-a"))  # node-a's membership expired.
    assert parts.membership.drop_expired() == ["node-a"]

    # Content that never expires has nobody left to hold it: it is gone. The
    # rest keeps its schedule, so it counts until the sweep expires it.
    assert parts.locations.content(forever.digest) is None
    assert parts.distinct() == LAYER.size
    clock.advance(HOUR)
    assert parts.schedule.sweep() == [LAYER.digest]
    assert parts.distinct() == 0


def test_terabyte_sizes_add_up_exactly(parts: Parts) -> None:
    # The scripts hand HINCRBY integer strings, never a Lua number's notation.
    huge = [ContentInfo(digest(n), 5 * 2**40 + n) for n in range(3)]
    parts.locations.announce("node-a", huge)
    assert parts.distinct() == sum(item.size for item in huge)

    parts.locations.drop("node-a", [huge[0].digest])
    assert parts.distinct() == huge[1].size + huge[2].size


def test_nodes_cannot_report_the_counter(parts: Parts) -> None:
    parts.fetch("node-a")

    with pytest.raises(InvalidArgument, match=DISTINCT_BYTES):
        parts.metrics.report("node-a", "worker-1", 1, {DISTINCT_BYTES: 1, "blob.hits": 1})

    assert parts.distinct() == LAYER.size
    assert parts.metrics.snapshot().cluster == {DISTINCT_BYTES: LAYER.size}
