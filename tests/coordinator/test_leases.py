"""Fetch leases against a real Redis: grants, fencing numbers, renew, release, expiry."""

from __future__ import annotations

import pytest
import redis

from coordinator.errors import InvalidArgument
from coordinator.keys import Keys
from coordinator.leases import Leases
from testbed.processes import wait_until


@pytest.fixture
def leases(redis_client: redis.Redis, keys: Keys) -> Leases:
    return Leases(redis_client, keys)


def test_one_holder_at_a_time(leases: Leases) -> None:
    first = leases.acquire("blob:x", "node-a", 10_000)
    second = leases.acquire("blob:x", "node-b", 10_000)

    assert first.granted and first.token and first.holder == "node-a"
    assert not second.granted and second.token == ""
    assert second.holder == "node-a" and second.fence == first.fence


def test_fence_grows_with_every_grant(leases: Leases) -> None:
    first = leases.acquire("blob:x", "node-a", 10_000)
    assert leases.release("blob:x", first.token)
    second = leases.acquire("blob:x", "node-b", 10_000)
    other_key = leases.acquire("blob:y", "node-a", 10_000)

    assert second.granted and second.fence > first.fence
    assert other_key.fence > second.fence


def test_retried_acquire_with_the_same_token_gets_the_same_grant(leases: Leases) -> None:
    first = leases.acquire("blob:x", "node-a", 10_000, token="retry-token-1")
    again = leases.acquire("blob:x", "node-a", 10_000, token="retry-token-1")

    assert again == first


def test_renew_needs_the_current_token(leases: Leases, redis_client: redis.Redis, keys: Keys) -> None:
    lease = leases.acquire("blob:x", "node-a", 1_000)

    assert not leases.renew("blob:x", "someone-elses-token", 60_000)
    assert redis_client.pttl(keys.lock("blob:x")) <= 1_000
    assert leases.renew("blob:x", lease.token, 60_000)
    assert redis_client.pttl(keys.lock("blob:x")) > 1_000


def test_release_with_a_stale_token_changes_nothing(leases: Leases) -> None:
    lease = leases.acquire("blob:x", "node-a", 10_000)

    assert not leases.release("blob:x", "stale-token-0")
    assert leases.current("blob:x") == lease
    assert leases.release("blob:x", lease.token)
    assert leases.current("blob:x") is None
    assert not leases.release("blob:x", lease.token)


def test_an_expired_lease_is_granted_to_the_next_node(leases: Leases) -> None:
    stale = leases.acquire("blob:x", "node-a", 50)
    wait_until(lambda: leases.current("blob:x") is None, timeout=5, message="lease never expired")

    fresh = leases.acquire("blob:x", "node-b", 10_000)

    assert fresh.granted and fresh.fence > stale.fence
    assert not leases.renew("blob:x", stale.token, 10_000)
    assert not leases.release("blob:x", stale.token)
    assert leases.current("blob:x") == fresh


@pytest.mark.parametrize("ttl_ms", [0, 10 * 60 * 1000 + 1])
def test_ttl_out_of_range_is_rejected(leases: Leases, ttl_ms: int) -> None:
    with pytest.raises(InvalidArgument, match="ttl_ms"):
        leases.acquire("blob:x", "node-a", ttl_ms)


def test_malformed_tokens_and_names_are_rejected(leases: Leases) -> None:
    with pytest.raises(InvalidArgument, match="token"):
        leases.acquire("blob:x", "node-a", 1_000, token="has spaces in it")
    with pytest.raises(InvalidArgument, match="key"):
        leases.acquire("", "node-a", 1_000)
    with pytest.raises(InvalidArgument, match="node_id"):
        leases.acquire("blob:x", "", 1_000)


def test_a_release_with_a_failure_reports_it_until_the_next_grant(leases: Leases) -> None:
    first = leases.acquire("blob:x", "node-a", 10_000)
    assert leases.failure("blob:x") == ""

    assert leases.release("blob:x", first.token, "the upstream sent too slowly")
    assert leases.failure("blob:x") == "the upstream sent too slowly"
    # The lease itself is free at once, and a new grant means a new fetch: the failure is forgotten.
    assert leases.acquire("blob:x", "node-b", 10_000).granted
    assert leases.failure("blob:x") == ""


def test_a_release_without_a_failure_or_with_a_stale_token_leaves_none(leases: Leases) -> None:
    first = leases.acquire("blob:x", "node-a", 10_000)
    assert not leases.release("blob:x", "stale-token-1", "too slow")
    assert leases.failure("blob:x") == ""
    assert leases.release("blob:x", first.token)
    assert leases.failure("blob:x") == ""
