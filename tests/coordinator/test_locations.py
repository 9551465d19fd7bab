"""The location directory against a real Redis: announce, drop, locate, re-announce."""

from __future__ import annotations

import pytest
import redis

from coordinator.errors import InvalidArgument
from coordinator.keys import Keys
from coordinator.leases import Leases
from coordinator.locations import ContentInfo, Locations
from coordinator.membership import Membership, NodeInfo
from coordinator.scheduler import Schedule
from protos.values import Holder
from testbed.clock import FakeClock
from testbed.redis_server import RedisServer
from tests.coordinator.digests import digest

HOUR = 3600.0


class Directory:
    """The collaborators a location test needs, on one Redis and one clock."""

    def __init__(self, client: redis.Redis, keys: Keys, clock: FakeClock) -> None:
        self.membership = Membership(client, keys, 10.0, clock)
        self.leases = Leases(client, keys)
        self.locations = Locations(client, keys, self.membership, self.leases, default_ttl=HOUR, clock=clock)
        self.schedule = Schedule(client, keys, clock)
        for name in ("a", "b"):
            self.membership.register(NodeInfo(f"node-{name}", f"http://{name}:5000"))


@pytest.fixture
def directory(redis_client: redis.Redis, keys: Keys, clock: FakeClock) -> Directory:
    return Directory(redis_client, keys, clock)


def test_announce_registers_content_with_meta_and_schedule(directory: Directory, clock: FakeClock) -> None:
    item = ContentInfo(digest(1), size=42, media_type="application/vnd.oci.image.layer.v1.tar+gzip")

    assert directory.locations.announce("node-a", [item]) == []

    found = directory.locations.locate(item.digest)
    assert found.holders == [Holder("node-a", "http://a:5000")]
    assert found.fetcher is None and not found.fetching
    assert found.content is not None
    assert (found.content.size, found.content.media_type) == (42, item.media_type)
    assert found.content.ttl_ms == HOUR * 1000
    assert found.content.first_cached == clock()
    assert directory.schedule.expiry(item.digest) == clock() + HOUR


def test_announce_replaces_the_previous_inventory(directory: Directory) -> None:
    kept, gone, new = digest("kept"), digest("gone"), digest("new")
    directory.locations.announce("node-a", [ContentInfo(kept, 1), ContentInfo(gone, 1)])
    directory.locations.announce("node-b", [ContentInfo(kept, 1)])

    directory.locations.announce("node-a", [ContentInfo(kept, 1), ContentInfo(new, 1)])

    assert directory.locations.held("node-a") == {kept, new}
    assert directory.locations.holders(kept) == {"node-a", "node-b"}
    assert directory.locations.holders(gone) == set()
    # Nobody holds "gone" any more: its meta and schedule entry are gone too.
    assert directory.locations.content(gone) is None
    assert directory.schedule.expiry(gone) is None


def test_add_registers_content_without_replacing_anything(directory: Directory, clock: FakeClock) -> None:
    directory.locations.announce("node-a", [ContentInfo(digest("announced"), 1)])
    directory.locations.announce("node-b", [ContentInfo(digest("copied"), 7, "application/octet-stream")])
    scheduled = directory.schedule.expiry(digest("copied"))
    clock.advance(60)

    # node-a copied the content from node-b: it keeps node-b's expiry.
    assert directory.locations.add("node-a", [ContentInfo(digest("copied"), 7)]) == []

    assert directory.locations.held("node-a") == {digest("announced"), digest("copied")}
    assert directory.locations.holders(digest("copied")) == {"node-a", "node-b"}
    assert directory.schedule.expiry(digest("copied")) == scheduled


def test_add_reports_content_whose_eviction_is_pending(directory: Directory, clock: FakeClock) -> None:
    directory.locations.announce("node-a", [ContentInfo(digest(1), 1)])
    clock.advance(HOUR)
    directory.schedule.sweep()

    assert directory.locations.add("node-a", [ContentInfo(digest(1), 1)]) == [digest(1)]
    assert directory.locations.holders(digest(1)) == set()
    assert directory.schedule.pop_evictions("node-a", 10) == [digest(1)], "the eviction stays queued"


def test_locate_returns_only_live_holders_and_the_live_fetcher(
    directory: Directory, redis_client: redis.Redis, keys: Keys
) -> None:
    directory.locations.announce("node-a", [ContentInfo(digest(1), 1)])
    directory.locations.announce("node-b", [ContentInfo(digest(1), 1)])
    lease = directory.leases.acquire(f"blob:{digest(1)}", "node-b", 10_000)
    assert lease.granted

    found = directory.locations.locate(digest(1), f"blob:{digest(1)}")
    assert [h.node_id for h in found.holders] == ["node-a", "node-b"]
    assert found.fetching and found.fetcher == Holder("node-b", "http://b:5000")

    redis_client.delete(keys.node("node-b"))  # node-b's membership expired.
    found = directory.locations.locate(digest(1), f"blob:{digest(1)}")
    assert [h.node_id for h in found.holders] == ["node-a"]
    # The lease still stands in the way, but there is nobody live to follow.
    assert found.fetching and found.fetcher is None


def test_a_bad_copy_report_unlists_only_that_holders_copy(directory: Directory) -> None:
    bad, other = digest("bad"), digest("other")
    directory.locations.announce("node-a", [ContentInfo(bad, 1), ContentInfo(other, 1)])
    directory.locations.announce("node-b", [ContentInfo(bad, 1)])
    directory.membership.register(NodeInfo("node-c", "http://c:5000"))

    assert directory.locations.report_bad_copy("node-c", "node-a", bad)
    assert directory.locations.holders(bad) == {"node-b"}
    assert directory.locations.held("node-a") == {other}
    assert directory.locations.content(bad) is not None, "node-b still holds it"
    assert directory.membership.live(["node-a"]) == {"node-a"}
    # Reported again (a retry, another reporter): nothing more goes.
    assert not directory.locations.report_bad_copy("node-b", "node-a", bad)
    assert directory.locations.holders(bad) == {"node-b"}


def test_a_bad_copy_is_reported_by_a_live_member_about_another(directory: Directory) -> None:
    directory.locations.announce("node-a", [ContentInfo(digest(1), 1)])
    with pytest.raises(InvalidArgument, match="live member"):
        directory.locations.report_bad_copy("node-gone", "node-a", digest(1))
    with pytest.raises(InvalidArgument, match="not its own"):
        directory.locations.report_bad_copy("node-a", "node-a", digest(1))
    with pytest.raises(InvalidArgument):
        directory.locations.report_bad_copy("node-b", "node-a", "sha256:nothex")
    assert directory.locations.holders(digest(1)) == {"node-a"}


def test_locate_unknown_content(directory: Directory) -> None:
    found = directory.locations.locate(digest("nobody"), "blob:whatever")
    assert found.holders == [] and found.content is None and not found.fetching


def test_drop_forgets_content_only_with_its_last_holder(directory: Directory) -> None:
    directory.locations.announce("node-a", [ContentInfo(digest(1), 1)])
    directory.locations.announce("node-b", [ContentInfo(digest(1), 1)])

    directory.locations.drop("node-a", [digest(1)])
    assert directory.locations.holders(digest(1)) == {"node-b"}
    assert directory.locations.content(digest(1)) is not None

    directory.locations.drop("node-b", [digest(1)])
    assert directory.locations.holders(digest(1)) == set()
    assert directory.locations.content(digest(1)) is None
    assert directory.schedule.expiry(digest(1)) is None


def test_announce_returns_content_whose_expiry_passed(directory: Directory, clock: FakeClock) -> None:
    directory.locations.announce("node-a", [ContentInfo(digest("old"), 1)])
    clock.advance(HOUR + 1)  # Due, but no sweep has run yet.

    evict = directory.locations.announce("node-b", [ContentInfo(digest("old"), 1), ContentInfo(digest("new"), 1)])

    assert evict == [digest("old")]
    assert directory.locations.holders(digest("old")) == {"node-a"}  # The sweep will tell node-a.
    assert directory.locations.holders(digest("new")) == {"node-b"}


def test_announce_delivers_pending_evictions(directory: Directory, clock: FakeClock) -> None:
    directory.locations.announce("node-a", [ContentInfo(digest(1), 1), ContentInfo(digest(2), 1)])
    clock.advance(HOUR + 1)
    assert sorted(directory.schedule.sweep()) == sorted([digest(1), digest(2)])

    # node-a re-announces before a heartbeat picked the evictions up: they
    # come back in the answer and are not registered again.
    evict = directory.locations.announce("node-a", [ContentInfo(digest(1), 1)])

    assert evict == [digest(1)]
    assert directory.locations.held("node-a") == set()
    assert directory.schedule.pop_evictions("node-a", 10) == []


def test_announce_keeps_the_scheduled_expiry_and_honours_accessed_at(directory: Directory, clock: FakeClock) -> None:
    directory.locations.announce("node-a", [ContentInfo(digest(1), 1)])
    scheduled = directory.schedule.expiry(digest(1))
    clock.advance(60)

    # An announcement is not a hit: without accessed_at it keeps the expiry...
    directory.locations.announce("node-a", [ContentInfo(digest(1), 1)])
    assert directory.schedule.expiry(digest(1)) == scheduled
    # ...and with a later accessed_at it pushes it as a touch would.
    directory.locations.announce("node-a", [ContentInfo(digest(1), 1, accessed_at=clock() - 10)])
    assert directory.schedule.expiry(digest(1)) == clock() - 10 + HOUR


def test_unscheduled_content_expires_from_its_accessed_at(directory: Directory, clock: FakeClock) -> None:
    stale = ContentInfo(digest("stale"), 1, accessed_at=clock() - HOUR - 1)
    recent = ContentInfo(digest("recent"), 1, accessed_at=clock() - 60)

    evict = directory.locations.announce("node-a", [stale, recent])

    assert evict == [stale.digest]
    assert directory.locations.content(stale.digest) is None
    assert directory.schedule.expiry(recent.digest) == clock() - 60 + HOUR


def test_announced_ttl_overrides_the_default_and_zero_never_expires(directory: Directory, clock: FakeClock) -> None:
    directory.locations.announce("node-a", [ContentInfo(digest("short"), 1)], ttl_ms=60_000)
    directory.locations.announce("node-b", [ContentInfo(digest("forever"), 1)], ttl_ms=0)

    assert directory.schedule.expiry(digest("short")) == clock() + 60
    assert directory.schedule.expiry(digest("forever")) is None
    content = directory.locations.content(digest("forever"))
    assert content is not None and content.ttl_ms == 0


def test_reannounce_after_flushall_rebuilds_locations_and_schedule(
    redis_server: RedisServer, redis_client: redis.Redis, keys: Keys, clock: FakeClock
) -> None:
    directory = Directory(redis_client, keys, clock)
    inventory = [ContentInfo(digest(n), n + 1, "application/octet-stream") for n in range(5)]
    directory.locations.announce("node-a", inventory)
    before = {item.digest: directory.schedule.expiry(item.digest) for item in inventory}

    redis_server.flushall()
    assert directory.locations.locate(inventory[0].digest).holders == []

    # What a node does when its heartbeat comes back "unknown".
    directory.membership.register(NodeInfo("node-a", "http://a:5000"))
    assert directory.locations.announce("node-a", inventory) == []

    for item in inventory:
        found = directory.locations.locate(item.digest)
        assert [h.node_id for h in found.holders] == ["node-a"]
        assert found.content is not None and found.content.size == item.size
        assert directory.schedule.expiry(item.digest) == before[item.digest]


def test_malformed_digests_are_rejected(directory: Directory) -> None:
    with pytest.raises(InvalidArgument, match=r"content\.digest"):
        directory.locations.announce("node-a", [ContentInfo("sha256:abc", 1)])
    with pytest.raises(InvalidArgument, match="digest"):
        directory.locations.locate("not-a-digest")
    with pytest.raises(InvalidArgument, match="digests"):
        directory.locations.drop("node-a", ["sha256:" + "A" * 64])


def test_a_claim_of_content_nobody_holds_grants_the_lease_once(directory: Directory) -> None:
    key = f"blob:{digest(1)}"
    first = directory.locations.claim(digest(1), key, "node-a", 10_000)
    assert first.holders == [] and first.lease is not None and first.lease.granted
    assert directory.leases.current(key) is not None

    second = directory.locations.claim(digest(1), key, "node-b", 10_000)
    assert second.holders == [] and second.lease is not None and not second.lease.granted
    assert second.fetcher == Holder("node-a", "http://a:5000")
    assert second.lease.fence == first.lease.fence


def test_a_claim_retried_with_its_token_gets_the_same_grant(directory: Directory) -> None:
    key = f"blob:{digest(1)}"
    first = directory.locations.claim(digest(1), key, "node-a", 10_000, "token-of-the-claim")
    again = directory.locations.claim(digest(1), key, "node-a", 10_000, "token-of-the-claim")
    assert first.lease is not None and again.lease is not None and again.lease.granted
    assert (again.lease.token, again.lease.fence) == (first.lease.token, first.lease.fence)


def test_a_claim_of_content_a_live_node_holds_lists_it_and_grants_nothing(directory: Directory) -> None:
    key = f"blob:{digest(1)}"
    directory.locations.announce("node-b", [ContentInfo(digest(1), 42, "application/octet-stream")])

    claimed = directory.locations.claim(digest(1), key, "node-a", 10_000)

    assert claimed.holders == [Holder("node-b", "http://b:5000")] and claimed.lease is None
    assert directory.leases.current(key) is None


def test_a_claim_of_content_only_dead_nodes_hold_grants_the_lease(
    directory: Directory, redis_client: redis.Redis, keys: Keys
) -> None:
    key = f"blob:{digest(1)}"
    directory.locations.announce("node-b", [ContentInfo(digest(1), 1)])
    redis_client.delete(keys.node("node-b"))  # node-b's membership expired.

    claimed = directory.locations.claim(digest(1), key, "node-a", 10_000)

    assert claimed.holders == [] and claimed.lease is not None and claimed.lease.granted
    current = directory.leases.current(key)
    assert current is not None and current.holder == "node-a"


def test_a_malformed_claim_is_refused_and_takes_nothing(directory: Directory, redis_client: redis.Redis) -> None:
    before = set(redis_client.keys("*"))
    for args in (
        ("sha256:nothex", f"blob:{digest(1)}", "node-a", 10_000),
        (digest(1), "", "node-a", 10_000),
        (digest(1), f"blob:{digest(1)}", "", 10_000),
        (digest(1), f"blob:{digest(1)}", "node-a", 0),
    ):
        with pytest.raises(InvalidArgument):
            directory.locations.claim(*args)
    assert set(redis_client.keys("*")) == before
