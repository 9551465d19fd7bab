"""Confirmed bindings against a real Redis: per repository, with the content's TTL, never shortened."""

from __future__ import annotations

import pytest
import redis

from coordinator.bindings import MAX_DIGESTS, Bindings
from coordinator.errors import InvalidArgument
from coordinator.keys import Keys
from testbed.processes import wait_until
from tests.coordinator.digests import digest

UPSTREAM, REPO = "registry.test:5000", "team/app"


@pytest.fixture
def bindings(redis_client: redis.Redis, keys: Keys) -> Bindings:
    return Bindings(redis_client, keys)


def test_a_confirmation_is_per_upstream_and_repository(bindings: Bindings) -> None:
    one, two = digest(1), digest(2)
    assert bindings.confirmed(UPSTREAM, REPO, [one, two]) == {}

    bindings.confirm(UPSTREAM, REPO, [one], 60_000)

    found = bindings.confirmed(UPSTREAM, REPO, [one, two])
    assert list(found) == [one]
    assert 59_000 < found[one] <= 60_000
    assert bindings.confirmed(UPSTREAM, "someone/else", [one]) == {}
    assert bindings.confirmed("ghcr.io", REPO, [one]) == {}


def test_a_confirmation_expires_with_its_ttl(bindings: Bindings) -> None:
    bindings.confirm(UPSTREAM, REPO, [digest(1)], 50)
    wait_until(lambda: bindings.confirmed(UPSTREAM, REPO, [digest(1)]) == {}, timeout=5, message="never expired")


def test_confirming_again_extends_but_never_shortens(bindings: Bindings, redis_client: redis.Redis, keys: Keys) -> None:
    key = keys.bound(UPSTREAM, REPO, digest(1))
    bindings.confirm(UPSTREAM, REPO, [digest(1)], 60_000)
    bindings.confirm(UPSTREAM, REPO, [digest(1)], 1_000)
    assert redis_client.pttl(key) > 59_000
    bindings.confirm(UPSTREAM, REPO, [digest(1)], 600_000)
    assert redis_client.pttl(key) > 599_000


def test_a_ttl_of_zero_never_expires(bindings: Bindings, redis_client: redis.Redis, keys: Keys) -> None:
    bindings.confirm(UPSTREAM, REPO, [digest(1)], 60_000)
    bindings.confirm(UPSTREAM, REPO, [digest(1)], 0)
    assert redis_client.pttl(keys.bound(UPSTREAM, REPO, digest(1))) == -1
    assert bindings.confirmed(UPSTREAM, REPO, [digest(1)]) == {digest(1): 0}
    # And a later confirmation with a TTL does not bring the expiry back.
    bindings.confirm(UPSTREAM, REPO, [digest(1)], 60_000)
    assert bindings.confirmed(UPSTREAM, REPO, [digest(1)]) == {digest(1): 0}


def test_bad_arguments_are_refused(bindings: Bindings) -> None:
    with pytest.raises(InvalidArgument):
        bindings.confirm(UPSTREAM, REPO, ["sha256:short"], 1000)
    with pytest.raises(InvalidArgument):
        bindings.confirm(UPSTREAM, "", [digest(1)], 1000)
    with pytest.raises(InvalidArgument):
        bindings.confirm(UPSTREAM, REPO, [digest(1)], -1)
    with pytest.raises(InvalidArgument):
        bindings.confirmed(UPSTREAM, REPO, [digest(n) for n in range(MAX_DIGESTS + 1)])
