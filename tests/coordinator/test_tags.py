"""Tag pointers against a real Redis: reads, lease-fenced writes, retention."""

from __future__ import annotations

import pytest
import redis

from coordinator.errors import InvalidArgument, LeaseLost
from coordinator.keys import Keys
from coordinator.leases import Leases
from coordinator.tags import Tags
from protos.leases import tag_lease
from protos.values import CLOCK_SKEW, TagPointer
from testbed.processes import wait_until
from tests.coordinator.digests import digest

UPSTREAM, REPO, TAG = "registry-1.docker.io", "library/alpine", "3.20"
LEASE = tag_lease(UPSTREAM, REPO, TAG)


@pytest.fixture
def leases(redis_client: redis.Redis, keys: Keys) -> Leases:
    return Leases(redis_client, keys)


@pytest.fixture
def tags(redis_client: redis.Redis, keys: Keys) -> Tags:
    return Tags(redis_client, keys, retention=3600)


def _redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def test_put_with_the_lease_then_get(tags: Tags, leases: Leases, redis_client: redis.Redis) -> None:
    pointer = TagPointer(digest(1), "application/vnd.oci.image.index.v1+json", 512, checked_at=1_700_000_000.5)
    assert tags.get(UPSTREAM, REPO, TAG) is None
    lease = leases.acquire(LEASE, "node-a", 10_000)

    before = _redis_now(redis_client)
    stamp = tags.put(UPSTREAM, REPO, TAG, pointer, lease.token)
    after = _redis_now(redis_client)

    # Stamped by Redis's clock, not the writer's.
    assert before <= stamp <= after
    assert tags.get(UPSTREAM, REPO, TAG) == TagPointer(pointer.digest, pointer.media_type, pointer.size, stamp)
    assert tags.get("ghcr.io", REPO, TAG) is None, "tags of different upstreams never mix"
    assert leases.current(LEASE) is not None, "putting a tag keeps the lease held"


def test_fencing_a_stale_lease_holder_cannot_move_the_tag(tags: Tags, leases: Leases) -> None:
    stale = leases.acquire(LEASE, "node-a", 50)
    wait_until(lambda: leases.current(LEASE) is None, timeout=5, message="lease never expired")
    fresh = leases.acquire(LEASE, "node-b", 10_000)
    tags.put(UPSTREAM, REPO, TAG, TagPointer(digest("new")), fresh.token)

    with pytest.raises(LeaseLost):
        tags.put(UPSTREAM, REPO, TAG, TagPointer(digest("old")), stale.token)

    pointer = tags.get(UPSTREAM, REPO, TAG)
    assert pointer is not None and pointer.digest == digest("new")


def test_a_releasing_put_frees_the_lease_and_its_retry_succeeds(tags: Tags, leases: Leases) -> None:
    lease = leases.acquire(LEASE, "node-a", 10_000)
    stamp = tags.put(UPSTREAM, REPO, TAG, TagPointer(digest(1)), lease.token, release=True)

    assert leases.current(LEASE) is None, "released with the write"
    # A retry (the first answer was lost) writes nothing and gets the same stamp.
    assert tags.put(UPSTREAM, REPO, TAG, TagPointer(digest(1)), lease.token, release=True) == stamp
    # Not for another digest, and not once another node holds the lease.
    with pytest.raises(LeaseLost):
        tags.put(UPSTREAM, REPO, TAG, TagPointer(digest(2)), lease.token, release=True)
    leases.acquire(LEASE, "node-b", 10_000)
    with pytest.raises(LeaseLost):
        tags.put(UPSTREAM, REPO, TAG, TagPointer(digest(1)), lease.token, release=True)
    pointer = tags.get(UPSTREAM, REPO, TAG)
    assert pointer is not None and (pointer.digest, pointer.checked_at) == (digest(1), stamp)


def test_the_lease_of_another_tag_does_not_count(tags: Tags, leases: Leases) -> None:
    other = leases.acquire(tag_lease(UPSTREAM, REPO, "latest"), "node-a", 10_000)

    with pytest.raises(LeaseLost):
        tags.put(UPSTREAM, REPO, TAG, TagPointer(digest(1)), other.token)
    with pytest.raises(LeaseLost):
        tags.put(UPSTREAM, REPO, TAG, TagPointer(digest(1)), "")


def test_pointers_expire_after_the_retention(redis_client: redis.Redis, keys: Keys, leases: Leases) -> None:
    tags = Tags(redis_client, keys, retention=0.05)
    lease = leases.acquire(LEASE, "node-a", 10_000)
    tags.put(UPSTREAM, REPO, TAG, TagPointer(digest(1)), lease.token)

    wait_until(lambda: tags.get(UPSTREAM, REPO, TAG) is None, timeout=5, message="pointer never expired")


def test_zero_retention_keeps_pointers(redis_client: redis.Redis, keys: Keys, leases: Leases) -> None:
    tags = Tags(redis_client, keys, retention=0)
    lease = leases.acquire(LEASE, "node-a", 10_000)
    tags.put(UPSTREAM, REPO, TAG, TagPointer(digest(1)), lease.token)

    assert redis_client.pttl(keys.tag(UPSTREAM, REPO, TAG)) == -1


def test_bad_pointers_are_rejected(tags: Tags, leases: Leases) -> None:
    lease = leases.acquire(LEASE, "node-a", 10_000)
    with pytest.raises(InvalidArgument, match=r"pointer\.digest"):
        tags.put(UPSTREAM, REPO, TAG, TagPointer("latest"), lease.token)
    with pytest.raises(InvalidArgument, match="tag"):
        tags.get(UPSTREAM, REPO, "")


def test_a_writer_with_a_clock_ahead_cannot_keep_a_tag_fresh(
    tags: Tags, leases: Leases, redis_client: redis.Redis
) -> None:
    lease = leases.acquire(LEASE, "node-a", 10_000)
    year_ahead = _redis_now(redis_client) + 365 * 86400
    stamp = tags.put(UPSTREAM, REPO, TAG, TagPointer(digest(1), checked_at=year_ahead), lease.token)
    pointer = tags.get(UPSTREAM, REPO, TAG)
    assert pointer is not None and pointer.checked_at == stamp < year_ahead
    assert not pointer.fresh(_redis_now(redis_client) + 301, tag_ttl=300)


def test_a_pointer_stamped_in_the_future_straight_into_redis_is_stale(
    tags: Tags, keys: Keys, redis_client: redis.Redis
) -> None:
    future = _redis_now(redis_client) + 86400
    redis_client.hset(keys.tag(UPSTREAM, REPO, TAG), mapping={"digest": digest(7), "checked_at": repr(future)})
    pointer = tags.get(UPSTREAM, REPO, TAG)
    assert pointer is not None and pointer.digest == digest(7)
    assert pointer.checked_at == 0.0
    assert not pointer.fresh(_redis_now(redis_client), tag_ttl=300)
    # Garbage in the hash reads as never checked, not as an error.
    redis_client.hset(keys.tag(UPSTREAM, REPO, TAG), mapping={"checked_at": "soon", "size": "-3"})
    garbled = tags.get(UPSTREAM, REPO, TAG)
    assert garbled is not None and (garbled.checked_at, garbled.size) == (0.0, 0)


def test_a_pointer_in_the_future_beyond_the_clock_skew_is_not_fresh() -> None:
    pointer = TagPointer(digest(1), checked_at=1000.0)
    assert pointer.fresh(1000.0 - CLOCK_SKEW, tag_ttl=300)
    assert not pointer.fresh(1000.0 - CLOCK_SKEW - 1, tag_ttl=300)
    assert pointer.fresh(1299.0, tag_ttl=300)
    assert not pointer.fresh(1300.0, tag_ttl=300)
