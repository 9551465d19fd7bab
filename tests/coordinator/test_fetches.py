"""Completing fetches against a real Redis: registration, fencing, TTLs."""

from __future__ import annotations

import pytest
import redis

from coordinator.errors import LeaseLost
from coordinator.fetches import Fetches
from coordinator.keys import Keys
from coordinator.leases import Leases
from coordinator.locations import ContentInfo, Locations
from coordinator.membership import Membership, NodeInfo
from coordinator.scheduler import Schedule
from protos.leases import blob_lease
from testbed.clock import FakeClock
from testbed.processes import wait_until
from tests.coordinator.digests import digest

LAYER = ContentInfo(digest("layer"), size=1234, media_type="application/vnd.oci.image.layer.v1.tar+gzip")
KEY = blob_lease(LAYER.digest)


class Parts:
    def __init__(self, client: redis.Redis, keys: Keys, clock: FakeClock) -> None:
        self.membership = Membership(client, keys, 10.0, clock)
        self.leases = Leases(client, keys)
        self.locations = Locations(client, keys, self.membership, self.leases, default_ttl=3600, clock=clock)
        self.fetches = Fetches(client, keys, clock)
        self.schedule = Schedule(client, keys, clock)
        for name in ("a", "b"):
            self.membership.register(NodeInfo(f"node-{name}", f"http://{name}:5000"))


@pytest.fixture
def parts(redis_client: redis.Redis, keys: Keys, clock: FakeClock) -> Parts:
    return Parts(redis_client, keys, clock)


def test_complete_registers_the_content_and_releases_the_lease(parts: Parts, clock: FakeClock) -> None:
    lease = parts.leases.acquire(KEY, "node-a", 10_000)

    parts.fetches.complete(KEY, lease.token, "node-a", LAYER, ttl_ms=60_000)

    found = parts.locations.locate(LAYER.digest, KEY)
    assert [h.node_id for h in found.holders] == ["node-a"] and not found.fetching
    assert found.content is not None and (found.content.size, found.content.media_type) == (1234, LAYER.media_type)
    assert parts.schedule.expiry(LAYER.digest) == clock() + 60
    assert parts.leases.current(KEY) is None


def test_a_retried_complete_succeeds(parts: Parts) -> None:
    lease = parts.leases.acquire(KEY, "node-a", 10_000)
    parts.fetches.complete(KEY, lease.token, "node-a", LAYER, ttl_ms=60_000)

    parts.fetches.complete(KEY, lease.token, "node-a", LAYER, ttl_ms=60_000)


def test_fencing_a_stale_holder_cannot_register_content(parts: Parts) -> None:
    stale = parts.leases.acquire(KEY, "node-a", 50)
    wait_until(lambda: parts.leases.current(KEY) is None, timeout=5, message="lease never expired")
    fresh = parts.leases.acquire(KEY, "node-b", 10_000)

    with pytest.raises(LeaseLost):
        parts.fetches.complete(KEY, stale.token, "node-a", LAYER, ttl_ms=60_000)

    assert parts.locations.holders(LAYER.digest) == set()
    assert parts.leases.current(KEY) == fresh, "the stale call must not release the new grant"
    parts.fetches.complete(KEY, fresh.token, "node-b", LAYER, ttl_ms=60_000)
    assert parts.locations.holders(LAYER.digest) == {"node-b"}


def test_complete_without_a_lease_fails(parts: Parts) -> None:
    with pytest.raises(LeaseLost):
        parts.fetches.complete(KEY, "never-granted", "node-a", LAYER, ttl_ms=60_000)
    with pytest.raises(LeaseLost):
        parts.fetches.complete(KEY, "", "node-a", LAYER, ttl_ms=60_000)


def test_the_longest_ttl_wins_and_never_beats_all(parts: Parts, clock: FakeClock) -> None:
    first = parts.leases.acquire(KEY, "node-a", 10_000)
    parts.fetches.complete(KEY, first.token, "node-a", LAYER, ttl_ms=120_000)
    second = parts.leases.acquire(KEY, "node-b", 10_000)
    parts.fetches.complete(KEY, second.token, "node-b", LAYER, ttl_ms=60_000)

    assert parts.schedule.expiry(LAYER.digest) == clock() + 120
    content = parts.locations.content(LAYER.digest)
    assert content is not None and content.ttl_ms == 120_000

    third = parts.leases.acquire(KEY, "node-b", 10_000)
    parts.fetches.complete(KEY, third.token, "node-b", LAYER, ttl_ms=0)
    assert parts.schedule.expiry(LAYER.digest) is None
