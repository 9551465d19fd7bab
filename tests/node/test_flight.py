"""The cluster's single flight, driven through every branch with a fake coordinator and a fake clock."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest

from node.coordinator_client import CoordinatorError, Lease
from node.flight import POLL, RENEW_RETRY, Announcements, Flight, Outcome, _LeaseRenewer
from protos.leases import blob_lease, tag_lease
from protos.values import Content, Holder, TagPointer
from testbed.clock import FakeClock
from testbed.fake_coordinator import FakeCoordinator, FakeDirectory
from testbed.processes import wait_until

DIGEST = "sha256:" + "ab" * 32
KEY = blob_lease(DIGEST)
CONTENT = Content(DIGEST, 5, "application/octet-stream")
WAIT = 10.0


class Counts:
    def __init__(self) -> None:
        self.counted: list[tuple[str, str]] = []

    def count(self, kind: str, counter: str, value: int = 1) -> None:
        self.counted.append((kind, counter))


@pytest.fixture
def directory() -> FakeDirectory:
    return FakeDirectory()


@pytest.fixture
def coordinator(directory: FakeDirectory) -> FakeCoordinator:
    return FakeCoordinator(directory, "node-a")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def counts() -> Counts:
    return Counts()


@pytest.fixture
def announcements(tmp_path) -> Announcements:
    return Announcements(str(tmp_path / "unannounced"))


@pytest.fixture
def flight(coordinator: FakeCoordinator, announcements: Announcements, counts: Counts, clock: FakeClock) -> Flight:
    return Flight(
        coordinator, "node-a", announcements, counts, lease_ttl=10.0, wait_timeout=WAIT, clock=clock, sleep=clock.sleep
    )


def look_at(coordinator: FakeCoordinator) -> Callable[[], Holder | None]:
    """A blob's look: the first other node that holds the digest."""

    def look() -> Holder | None:
        holders = [h for h in coordinator.locate(DIGEST, KEY).holders if h.node_id != coordinator.node_id]
        return holders[0] if holders else None

    return look


def test_content_on_a_peer_is_found_without_a_lease(flight: Flight, directory, coordinator) -> None:
    directory.hold("node-b", CONTENT)
    with flight.coordinate(KEY, look_at(coordinator), kind="blob") as turn:
        assert turn.outcome is Outcome.FOUND and turn.found == directory.holder("node-b")
        flight.committed(turn, CONTENT, 1000)
    assert coordinator.calls("acquire_lease") == []
    assert directory.holders[DIGEST] == {"node-a", "node-b"}


def test_a_miss_is_granted_and_completed_after_the_commit(flight: Flight, directory, coordinator) -> None:
    with flight.coordinate(KEY, look_at(coordinator), kind="blob") as turn:
        assert turn.outcome is Outcome.GRANTED
        assert directory.leases[KEY].node_id == "node-a"
        assert DIGEST not in directory.holders
        flight.committed(turn, CONTENT, 1000)
    assert coordinator.calls("complete_fetch") == [KEY]
    assert coordinator.calls("abort_fetch") == []
    assert directory.holders[DIGEST] == {"node-a"} and KEY not in directory.leases


def test_a_fetch_completed_just_before_the_lease_is_not_fetched_again(flight: Flight, directory, coordinator) -> None:
    def another_node_completes(method: str) -> None:
        if method == "acquire_lease":
            directory.hold("node-b", CONTENT)

    directory.before = another_node_completes
    with flight.coordinate(KEY, look_at(coordinator), kind="blob") as turn:
        assert turn.outcome is Outcome.FOUND and turn.found == directory.holder("node-b")
    assert coordinator.calls("locate") == [DIGEST, DIGEST]
    assert coordinator.calls("abort_fetch") == [KEY]
    assert KEY not in directory.leases


def test_an_unusable_coordinator_on_the_second_look_keeps_the_grant(flight: Flight, directory, coordinator) -> None:
    def fail_after_the_grant(method: str) -> None:
        directory.down = method == "locate" and bool(coordinator.calls("acquire_lease"))

    directory.before = fail_after_the_grant
    with flight.coordinate(KEY, look_at(coordinator), kind="blob") as turn:
        assert turn.outcome is Outcome.GRANTED


def test_a_fetch_in_progress_on_another_node_is_followed(flight: Flight, directory, coordinator, counts) -> None:
    directory.grant(KEY, "node-b")
    followed: list[Holder] = []

    def follow(holder: Holder) -> Holder:
        followed.append(holder)
        return holder

    with flight.coordinate(KEY, look_at(coordinator), follow, kind="blob") as turn:
        assert turn.outcome is Outcome.FOUND and turn.found == directory.holder("node-b")
    assert followed == [directory.holder("node-b")]
    assert counts.counted == []


def test_a_lease_held_by_a_node_without_an_address_is_not_followed(flight: Flight, directory, coordinator) -> None:
    directory.grant(KEY, "node-gone")
    directory.urls["node-gone"] = ""

    def follow(holder: Holder) -> Holder:
        raise AssertionError("followed a node that cannot be reached")

    def released_later(seconds: float) -> None:
        del directory.leases[KEY]

    flight._sleep = released_later
    with flight.coordinate(KEY, look_at(coordinator), follow, kind="blob") as turn:
        assert turn.outcome is Outcome.GRANTED


def test_a_wait_ends_when_the_other_node_completes(flight: Flight, directory, coordinator, counts, clock) -> None:
    directory.grant(KEY, "node-b")
    slept: list[float] = []

    def other_node_completes(seconds: float) -> None:
        slept.append(seconds)
        clock.sleep(seconds)
        if len(slept) == 3:
            del directory.leases[KEY]
            directory.hold("node-b", CONTENT)

    flight._sleep = other_node_completes
    with flight.coordinate(KEY, look_at(coordinator), lambda holder: None, kind="blob") as turn:
        assert turn.outcome is Outcome.FOUND
    assert slept == [POLL] * 3
    assert counts.counted == [("blob", "lease_waits")]


def test_a_fetch_that_never_ends_is_waited_out(flight: Flight, directory, coordinator, counts, clock) -> None:
    directory.grant(KEY, "node-b")
    started = clock()
    with flight.coordinate(KEY, look_at(coordinator), kind="blob") as turn:
        assert turn.outcome is Outcome.WAITED_OUT
        flight.committed(turn, CONTENT, 1000)
    assert WAIT < clock() - started <= WAIT + POLL * 2
    assert counts.counted == [("blob", "lease_waits")]
    assert coordinator.calls("add_content") == [DIGEST]
    assert directory.leases[KEY].node_id == "node-b"


def test_a_wait_without_a_kind_counts_nothing(flight: Flight, directory, coordinator, counts) -> None:
    directory.grant(KEY, "node-b")
    with flight.coordinate(KEY, look_at(coordinator)) as turn:
        assert turn.outcome is Outcome.WAITED_OUT
    assert counts.counted == []


@pytest.mark.parametrize("failing", ["locate", "acquire_lease"])
def test_an_unusable_coordinator_means_degraded(
    flight: Flight, directory, coordinator, announcements, counts, failing: str
) -> None:
    directory.before = lambda method: setattr(directory, "down", method == failing)
    with flight.coordinate(KEY, look_at(coordinator), kind="blob") as turn:
        assert turn.outcome is Outcome.DEGRADED
        assert not announcements.pending()
        flight.committed(turn, CONTENT, 1000)
    assert announcements.pending()
    assert DIGEST not in directory.holders
    assert counts.counted == [("blob", "degraded")]


def test_a_refusing_coordinator_means_degraded_too(flight: Flight, coordinator, counts) -> None:
    def refuse() -> None:
        raise CoordinatorError("wrong secret", "UNAUTHENTICATED")

    with flight.coordinate(KEY, refuse) as turn:
        assert turn.outcome is Outcome.DEGRADED
    # Only a tag check passes no kind.
    assert counts.counted == [("tag", "degraded")]


def test_a_failed_fetch_releases_the_lease_at_once(flight: Flight, directory, coordinator) -> None:
    with pytest.raises(RuntimeError), flight.coordinate(KEY, look_at(coordinator), kind="blob") as turn:
        assert turn.outcome is Outcome.GRANTED
        raise RuntimeError("the upstream broke off")
    assert coordinator.calls("abort_fetch") == [KEY]
    assert KEY not in directory.leases and DIGEST not in directory.holders


def test_leaving_without_a_commit_releases_the_lease(flight: Flight, directory, coordinator) -> None:
    with flight.coordinate(KEY, look_at(coordinator)) as turn:
        assert turn.outcome is Outcome.GRANTED
    assert coordinator.calls("abort_fetch") == [KEY]
    assert KEY not in directory.leases


def test_content_gone_from_the_store_is_not_announced(flight: Flight, directory, coordinator) -> None:
    with flight.coordinate(KEY, look_at(coordinator)) as turn:
        flight.committed(turn, None, 1000)
    assert coordinator.calls("complete_fetch") == []
    assert DIGEST not in directory.holders


def test_a_lease_taken_over_during_the_fetch_is_announced_later(
    flight: Flight, directory, coordinator, announcements
) -> None:
    with flight.coordinate(KEY, look_at(coordinator)) as turn:
        directory.grant(KEY, "node-b")
        flight.committed(turn, CONTENT, 1000)
    assert announcements.pending()
    assert directory.leases[KEY].node_id == "node-b"
    assert coordinator.calls("abort_fetch") == []


def test_an_unreachable_coordinator_after_the_commit_is_announced_later(
    flight: Flight, directory, coordinator, announcements
) -> None:
    with flight.coordinate(KEY, look_at(coordinator)) as turn:
        directory.down = True
        flight.committed(turn, CONTENT, 1000)
    assert announcements.pending()


def test_the_lease_is_renewed_while_the_fetch_runs(directory, coordinator, announcements, counts) -> None:
    flight = Flight(coordinator, "node-a", announcements, counts, lease_ttl=0.03, wait_timeout=WAIT)
    with flight.coordinate(KEY, look_at(coordinator)) as turn:
        assert turn.outcome is Outcome.GRANTED
        wait_until(lambda: len(coordinator.calls("renew_lease")) >= 2, timeout=5, message="no renewal")
    renewed = len(coordinator.calls("renew_lease"))
    assert all(thread.name != f"renew-{KEY[:24]}" for thread in threading.enumerate())
    assert len(coordinator.calls("renew_lease")) == renewed


# Renewal, step by step on the fake clock: a lease of 3 s, renewed every 0.75 s.

TTL_MS = 3000


def renewer_for(directory: FakeDirectory, coordinator: FakeCoordinator, clock: FakeClock) -> _LeaseRenewer:
    return _LeaseRenewer(coordinator, KEY, directory.grant(KEY, "node-a"), TTL_MS, clock)


def test_a_lease_is_renewed_every_quarter_of_its_lifetime(directory, coordinator, clock) -> None:
    renewer = renewer_for(directory, coordinator, clock)
    assert renewer.interval == 0.75
    for _ in range(5):
        clock.advance(renewer.interval)
        assert renewer.renew() == 0.75
        # The lease now stands for a whole lifetime from the renewal.
        assert renewer.expires == clock() + 3.0
    assert len(coordinator.calls("renew_lease")) == 5


def test_a_failed_renewal_is_tried_again_soon_until_the_lease_would_have_run_out(directory, coordinator, clock) -> None:
    renewer = renewer_for(directory, coordinator, clock)
    expires = renewer.expires
    clock.advance(1.0)
    directory.down = True
    delays = []
    while (delay := renewer.renew()) is not None:
        delays.append(delay)
        clock.advance(delay)
    # Tried again every RENEW_RETRY, and the last wait ends just when the lease does.
    assert delays[:-1] == [RENEW_RETRY] * (len(delays) - 1)
    assert clock() == pytest.approx(expires)
    assert len(coordinator.calls("renew_lease")) == len(delays)


def test_a_renewal_that_gets_through_again_keeps_the_lease(directory, coordinator, clock) -> None:
    renewer = renewer_for(directory, coordinator, clock)
    clock.advance(1.0)
    directory.down = True
    assert renewer.renew() == RENEW_RETRY
    clock.advance(1.5)
    directory.down = False
    assert renewer.renew() == 0.75
    assert renewer.expires == clock() + 3.0


def test_renewing_stops_once_another_node_holds_the_lease(directory, coordinator, clock, caplog) -> None:
    renewer = renewer_for(directory, coordinator, clock)
    # The lease ran out (a stall longer than its lifetime) and node-b took it.
    directory.grant(KEY, "node-b")
    clock.advance(1.0)
    with caplog.at_level(logging.WARNING, logger="node.flight"):
        assert renewer.renew() is None
    assert "lost the lease" in caplog.text


def test_a_renewal_refused_after_the_holder_ended_the_lease_is_quiet(directory, coordinator, clock, caplog) -> None:
    # A renewal sent while the holder's CompleteFetch was on the way finds the lease gone.
    settled = False
    renewer = _LeaseRenewer(coordinator, KEY, directory.grant(KEY, "node-a"), TTL_MS, clock, lambda: settled)
    settled = True
    del directory.leases[KEY]
    clock.advance(1.0)
    with caplog.at_level(logging.WARNING, logger="node.flight"):
        assert renewer.renew() is None
    assert caplog.text == ""


TAG_KEY = tag_lease("docker.io", "library/alpine", "3.20")
POINTER = TagPointer(DIGEST, "application/vnd.oci.image.index.v1+json", 512, 1_000.0)


def test_a_tag_answer_is_shared_under_the_lease(flight: Flight, directory, coordinator) -> None:
    with flight.coordinate(TAG_KEY, lambda: None) as turn:
        flight.share_tag(turn, "docker.io", "library/alpine", "3.20", POINTER)
        assert TAG_KEY not in directory.leases, "released with the answer"
    assert directory.tags[("docker.io", "library/alpine", "3.20")] == POINTER
    assert coordinator.calls("abort_fetch") == [], "no second call to release it"


def test_a_tag_answer_counts_as_settled_while_it_is_on_the_way(flight: Flight, directory) -> None:
    # So that a renewal crossing it, refused, is expected and not logged as a lost lease.
    seen = []
    with flight.coordinate(TAG_KEY, lambda: None) as turn:
        directory.before = lambda method: seen.append((method, turn.settled))
        flight.share_tag(turn, "docker.io", "library/alpine", "3.20", POINTER)
        directory.before = None
    assert seen == [("put_tag", True)]


def test_a_tag_answer_is_not_shared_without_the_lease(flight: Flight, directory, coordinator) -> None:
    directory.before = lambda method: setattr(directory, "down", method == "acquire_lease")
    with flight.coordinate(TAG_KEY, lambda: None) as turn:
        assert turn.outcome is Outcome.DEGRADED
        flight.share_tag(turn, "docker.io", "library/alpine", "3.20", POINTER)
    directory.before = None
    with flight.coordinate(TAG_KEY, lambda: None) as turn:
        directory.grant(TAG_KEY, "node-b")
        flight.share_tag(turn, "docker.io", "library/alpine", "3.20", POINTER)
    assert directory.tags == {}


# A claim: the look and the lease in one call.


def claim_at(
    coordinator: FakeCoordinator, *, serving: bool = True
) -> Callable[[int], tuple[Holder | None, Lease | None]]:
    """A blob's claim: the first other node that holds the digest (none when ``serving`` is false), and the lease."""

    def claim(ttl_ms: int) -> tuple[Holder | None, Lease | None]:
        claimed = coordinator.claim(DIGEST, KEY, ttl_ms)
        holders = [h for h in claimed.holders if h.node_id != coordinator.node_id]
        return (holders[0] if holders and serving else None), claimed.lease

    return claim


def test_a_claimed_miss_costs_one_call_before_the_fetch(flight: Flight, directory, coordinator) -> None:
    with flight.coordinate(KEY, look_at(coordinator), kind="blob", claim=claim_at(coordinator)) as turn:
        assert turn.outcome is Outcome.GRANTED
        assert [method for _, method, _ in directory.calls] == ["claim"]
        flight.committed(turn, CONTENT, 1000)
    assert coordinator.calls("complete_fetch") == [KEY]
    assert directory.holders[DIGEST] == {"node-a"} and KEY not in directory.leases


def test_a_claim_finds_a_holder_without_a_lease(flight: Flight, directory, coordinator) -> None:
    directory.hold("node-b", CONTENT)
    with flight.coordinate(KEY, look_at(coordinator), kind="blob", claim=claim_at(coordinator)) as turn:
        assert turn.outcome is Outcome.FOUND and turn.found == directory.holder("node-b")
    assert [method for _, method, _ in directory.calls] == ["claim"]
    assert KEY not in directory.leases


def test_holders_that_do_not_serve_lead_to_the_lease_and_the_second_look(
    flight: Flight, directory, coordinator
) -> None:
    directory.hold("node-b", CONTENT)
    claim = claim_at(coordinator, serving=False)

    def look() -> Holder | None:
        return None

    with flight.coordinate(KEY, look, kind="blob", claim=claim) as turn:
        assert turn.outcome is Outcome.GRANTED
    assert [method for _, method, _ in directory.calls] == ["claim", "acquire_lease", "abort_fetch"]


def test_a_claim_of_a_fetch_in_progress_follows_its_fetcher(flight: Flight, directory, coordinator) -> None:
    directory.grant(KEY, "node-b")
    followed: list[Holder] = []

    def follow(holder: Holder) -> Holder:
        followed.append(holder)
        return holder

    with flight.coordinate(KEY, look_at(coordinator), follow, kind="blob", claim=claim_at(coordinator)) as turn:
        assert turn.outcome is Outcome.FOUND
    assert followed == [directory.holder("node-b")]
    assert coordinator.calls("acquire_lease") == []


def test_an_unusable_coordinator_on_a_claim_means_degraded(flight: Flight, directory, coordinator, counts) -> None:
    directory.down = True
    with flight.coordinate(KEY, look_at(coordinator), kind="blob", claim=claim_at(coordinator)) as turn:
        assert turn.outcome is Outcome.DEGRADED
    assert counts.counted == [("blob", "degraded")]
