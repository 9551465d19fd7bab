"""Membership against a real Redis: heartbeats, expiry, and the cleanup of dead nodes."""

from __future__ import annotations

import pytest
import redis

from coordinator.errors import InvalidArgument
from coordinator.keys import Keys
from coordinator.leases import Leases
from coordinator.locations import ContentInfo, Locations
from coordinator.membership import CLEANUP_CHUNK, Membership, NodeInfo
from testbed.clock import FakeClock
from testbed.processes import wait_until
from tests.coordinator.digests import digest

NODE_A = NodeInfo("node-a", "http://a:5000", capacity_bytes=100, used_bytes=10)
NODE_B = NodeInfo("node-b", "http://b:5000")


def build(client: redis.Redis, keys: Keys, clock: FakeClock, ttl: float = 10.0) -> tuple[Membership, Locations]:
    membership = Membership(client, keys, ttl, clock)
    locations = Locations(client, keys, membership, Leases(client, keys), default_ttl=3600, clock=clock)
    return membership, locations


def test_register_then_heartbeat(redis_client: redis.Redis, keys: Keys, clock: FakeClock) -> None:
    membership, _ = build(redis_client, keys, clock)

    assert not membership.heartbeat(NODE_A)
    membership.register(NODE_A)

    assert membership.heartbeat(NodeInfo("node-a", "http://a:5000", capacity_bytes=100, used_bytes=20))
    assert membership.get("node-a") == NodeInfo("node-a", "http://a:5000", capacity_bytes=100, used_bytes=20)
    assert membership.urls(["node-a", "node-b"]) == {"node-a": "http://a:5000"}
    assert membership.ttl_ms == 10_000


def test_heartbeats_keep_a_node_alive_and_silence_expires_it(
    redis_client: redis.Redis, keys: Keys, clock: FakeClock
) -> None:
    membership, _ = build(redis_client, keys, clock, ttl=0.3)
    membership.register(NODE_A)
    membership.register(NODE_B)

    # node-a keeps sending heartbeats; node-b goes quiet and Redis expires it.
    wait_until(
        lambda: membership.heartbeat(NODE_A) and membership.get("node-b") is None,
        timeout=5,
        message="node-b never expired",
    )

    assert membership.live(["node-a", "node-b"]) == {"node-a"}
    assert not membership.heartbeat(NODE_B), "a heartbeat must not bring an expired node back"


def test_expired_membership_drops_all_locations(redis_client: redis.Redis, keys: Keys, clock: FakeClock) -> None:
    membership, locations = build(redis_client, keys, clock)
    membership.register(NODE_A)
    membership.register(NODE_B)
    shared, only_a = digest("shared"), digest("only-a")
    locations.announce("node-a", [ContentInfo(shared, 10), ContentInfo(only_a, 20)])
    locations.announce("node-b", [ContentInfo(shared, 10)])

    redis_client.delete(keys.node("node-a"))  # What Redis does when the PX runs out.
    # The dead node is hidden from readers at once, before any cleanup.
    assert [holder.node_id for holder in locations.locate(shared).holders] == ["node-b"]
    assert membership.drop_expired() == ["node-a"]

    assert locations.holders(shared) == {"node-b"}
    assert locations.holders(only_a) == set()
    assert locations.held("node-a") == set()
    assert not redis_client.sismember(keys.nodes(), "node-a")
    assert redis_client.sismember(keys.nodes(), "node-b")
    # The schedule and meta of content nobody holds now stay, so node-a's
    # content keeps its expiry if node-a comes back and announces it.
    assert locations.content(only_a) is not None
    assert membership.drop_expired() == []


def test_cleanup_spans_several_steps_for_a_large_inventory(
    redis_client: redis.Redis, keys: Keys, clock: FakeClock
) -> None:
    membership, locations = build(redis_client, keys, clock)
    membership.register(NODE_A)
    digests = [digest(n) for n in range(CLEANUP_CHUNK * 2 + 5)]
    locations.announce("node-a", [ContentInfo(d, 1) for d in digests])

    redis_client.delete(keys.node("node-a"))
    assert membership.drop_expired() == ["node-a"]

    assert locations.held("node-a") == set()
    assert all(not locations.holders(d) for d in digests[:: CLEANUP_CHUNK // 2])


def test_a_node_that_registered_again_is_not_dropped(redis_client: redis.Redis, keys: Keys, clock: FakeClock) -> None:
    membership, locations = build(redis_client, keys, clock)
    membership.register(NODE_A)
    locations.announce("node-a", [ContentInfo(digest(1), 1)])
    redis_client.delete(keys.node("node-a"))
    membership.register(NODE_A)

    assert membership.drop_expired() == []
    assert locations.holders(digest(1)) == {"node-a"}


def test_never_expiring_content_loses_its_meta_with_its_last_holder(
    redis_client: redis.Redis, keys: Keys, clock: FakeClock
) -> None:
    membership, locations = build(redis_client, keys, clock)
    membership.register(NODE_A)
    locations.announce("node-a", [ContentInfo(digest(1), 1)], ttl_ms=0)
    redis_client.delete(keys.node("node-a"))

    membership.drop_expired()

    # No sweep would ever remove the meta of content without a schedule entry.
    assert locations.content(digest(1)) is None


def test_node_fields_are_validated(redis_client: redis.Redis, keys: Keys, clock: FakeClock) -> None:
    membership, _ = build(redis_client, keys, clock)
    with pytest.raises(InvalidArgument, match=r"node\.id"):
        membership.register(NodeInfo("", "http://a"))
    with pytest.raises(InvalidArgument, match=r"node\.url"):
        membership.register(NodeInfo("node-a", ""))
