"""The TTL schedule and the leader-elected sweep, against a real Redis."""

from __future__ import annotations

import time

import pytest
import redis

from coordinator.election import LeaderElection
from coordinator.keys import Keys
from coordinator.leases import Leases
from coordinator.locations import ContentInfo, Locations
from coordinator.membership import Membership, NodeInfo
from coordinator.scheduler import Schedule, Scheduler
from testbed.clock import FakeClock
from testbed.processes import wait_until
from tests.coordinator.digests import digest

HOUR = 3600.0


class Cluster:
    """Membership, directory and schedule on one Redis and one clock, with nodes a and b."""

    def __init__(self, client: redis.Redis, keys: Keys, clock: FakeClock) -> None:
        self.client, self.keys, self.clock = client, keys, clock
        self.membership = Membership(client, keys, 10.0, clock)
        self.locations = Locations(client, keys, self.membership, Leases(client, keys), default_ttl=HOUR, clock=clock)
        self.schedule = Schedule(client, keys, clock)
        for name in ("a", "b"):
            self.membership.register(NodeInfo(f"node-{name}", f"http://{name}:5000"))

    def scheduler(self, identity: str, *, lease: float = 5.0, interval: float = 1.0) -> Scheduler:
        return Scheduler(
            self.schedule, self.membership, LeaderElection(self.client, self.keys, lease, identity), interval
        )


@pytest.fixture
def cluster(redis_client: redis.Redis, keys: Keys, clock: FakeClock) -> Cluster:
    return Cluster(redis_client, keys, clock)


def test_sweep_delivers_evictions_to_every_holder_and_removes_locations(cluster: Cluster) -> None:
    expiring, other = digest("expiring"), digest("other")
    cluster.locations.announce("node-a", [ContentInfo(expiring, 1), ContentInfo(other, 1)])
    cluster.locations.announce("node-b", [ContentInfo(expiring, 1)])
    cluster.clock.advance(HOUR / 2)
    cluster.schedule.touch([other])
    cluster.clock.advance(HOUR / 2)

    assert cluster.schedule.sweep() == [expiring]

    assert cluster.schedule.pop_evictions("node-a", 10) == [expiring]
    assert cluster.schedule.pop_evictions("node-b", 10) == [expiring]
    assert cluster.schedule.pop_evictions("node-a", 10) == []
    assert cluster.locations.locate(expiring).holders == []
    assert cluster.locations.content(expiring) is None
    assert cluster.schedule.expiry(expiring) is None
    assert cluster.locations.held("node-a") == {other}
    assert cluster.locations.held("node-b") == set()


def test_nothing_expires_before_its_time(cluster: Cluster) -> None:
    cluster.locations.announce("node-a", [ContentInfo(digest(1), 1)])
    cluster.clock.advance(HOUR - 1)

    assert cluster.schedule.sweep() == []
    assert cluster.locations.holders(digest(1)) == {"node-a"}


def test_touch_pushes_the_expiry_forward_never_back(cluster: Cluster) -> None:
    cluster.locations.announce("node-a", [ContentInfo(digest(1), 1)])
    start = cluster.clock()
    cluster.clock.advance(HOUR - 1)

    cluster.schedule.touch([digest(1)])
    assert cluster.schedule.expiry(digest(1)) == start + 2 * HOUR - 1
    cluster.clock.advance(2)
    assert cluster.schedule.sweep() == []

    # A touch stamped earlier than the last one (a slow batch, or a replica
    # whose clock is behind) cannot shorten it.
    behind = Schedule(cluster.client, cluster.keys, FakeClock(start))
    behind.touch([digest(1)])
    assert cluster.schedule.expiry(digest(1)) == start + 2 * HOUR - 1


def test_touch_never_schedules_unknown_or_swept_content(cluster: Cluster) -> None:
    cluster.schedule.touch([digest("unknown")])
    assert cluster.schedule.expiry(digest("unknown")) is None


def test_ttl_zero_never_expires(cluster: Cluster) -> None:
    cluster.locations.announce("node-a", [ContentInfo(digest("forever"), 1)], ttl_ms=0)
    cluster.schedule.touch([digest("forever")])
    cluster.clock.advance(10 * 365 * 24 * HOUR)

    assert cluster.schedule.sweep() == []
    assert cluster.schedule.expiry(digest("forever")) is None
    assert cluster.locations.holders(digest("forever")) == {"node-a"}


def test_pop_evictions_hands_out_at_most_count(cluster: Cluster) -> None:
    cluster.locations.announce("node-a", [ContentInfo(digest(n), 1) for n in range(5)])
    cluster.clock.advance(HOUR)
    assert len(cluster.schedule.sweep()) == 5

    first = cluster.schedule.pop_evictions("node-a", 3)
    rest = cluster.schedule.pop_evictions("node-a", 3)

    assert len(first) == 3 and len(rest) == 2
    assert sorted(first + rest) == sorted(digest(n) for n in range(5))


def test_the_schedule_survives_a_restart(cluster: Cluster) -> None:
    cluster.locations.announce("node-a", [ContentInfo(digest(1), 1)])
    cluster.clock.advance(HOUR)

    # A new coordinator process: fresh objects, same Redis.
    restarted = Schedule(cluster.client, cluster.keys, cluster.clock)

    assert restarted.sweep() == [digest(1)]
    assert restarted.pop_evictions("node-a", 10) == [digest(1)]


def test_the_leader_sweep_also_drops_dead_nodes(cluster: Cluster) -> None:
    cluster.locations.announce("node-b", [ContentInfo(digest(1), 1)])
    cluster.client.delete(cluster.keys.node("node-b"))

    assert cluster.scheduler("one").run_once()

    assert cluster.locations.holders(digest(1)) == set()


def test_only_the_leader_sweeps(cluster: Cluster) -> None:
    first, second = cluster.scheduler("first"), cluster.scheduler("second")
    cluster.locations.announce("node-a", [ContentInfo(digest(1), 1)])
    cluster.clock.advance(HOUR)

    assert first.run_once()
    assert not second.run_once()
    assert first.run_once(), "the leader renews its lead every round"
    assert first.election.leader() == "first"


def test_a_crashed_leader_is_replaced_within_the_lease(cluster: Cluster) -> None:
    lease = 0.3
    crashed = LeaderElection(cluster.client, cluster.keys, lease, "crashed")
    successor = LeaderElection(cluster.client, cluster.keys, lease, "successor")
    assert crashed.try_lead()
    started = time.monotonic()

    # The crashed leader never renews nor resigns; its lease runs out.
    wait_until(successor.try_lead, timeout=5, interval=0.02, message="the successor never took the lead")

    assert time.monotonic() - started < lease + 0.5
    assert not crashed.try_lead()


def test_stopping_the_leader_hands_the_sweep_over(cluster: Cluster) -> None:
    lease, interval = 0.5, 0.05
    swept: dict[str, int] = {"first": 0, "second": 0}

    def counting(scheduler: Scheduler, name: str) -> Scheduler:
        run_once = scheduler.run_once

        def counted() -> bool:
            led = run_once()
            swept[name] += led
            return led

        scheduler.run_once = counted  # type: ignore[method-assign]
        return scheduler

    first = counting(cluster.scheduler("first", lease=lease, interval=interval), "first")
    second = counting(cluster.scheduler("second", lease=lease, interval=interval), "second")
    first.start()
    wait_until(lambda: swept["first"] >= 3, timeout=5, message="the first scheduler never led")
    second.start()
    try:
        wait_until(lambda: swept["first"] >= 8, timeout=5, message="the first scheduler stopped leading")
        assert swept["second"] == 0, "only the leader sweeps"

        started = time.monotonic()
        first.close()
        wait_until(lambda: swept["second"] >= 1, timeout=5, message="the second scheduler never took over")
        assert time.monotonic() - started < lease
        assert cluster.scheduler("observer").election.leader() == "second"
    finally:
        first.close()
        second.close()
    second.close()  # Closing twice is harmless.
