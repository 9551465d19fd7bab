"""The coordinator addresses' circuit breakers, on the shared fake clock."""

from __future__ import annotations

import pytest

from node.breaker import Breakers, Marks, Shared
from node.storage.layout import Layout
from testbed.clock import FakeClock

ADDRESSES = ["c1:7000", "c2:7000", "c3:7000"]
COOL_OFF = 1.0
PROBE_TIMEOUT = 2.0
# How long a mark holds: two cool-offs and a probe.
HOLD = 2 * COOL_OFF + PROBE_TIMEOUT


class Reported:
    def __init__(self) -> None:
        self.states: list[tuple[str, bool]] = []

    def coordinator_reachable(self, address: str, reachable: bool) -> None:
        self.states.append((address, reachable))


class Board:
    """``Shared`` in memory: the marks the workers of one node see."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}

    def down_until(self, address: str) -> float | None:
        return self.marks.get(address)

    def mark_down(self, address: str, until: float) -> None:
        self.marks[address] = until

    def clear(self, address: str) -> None:
        self.marks.pop(address, None)


def _typed(board: Board) -> Shared:
    return board


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def reported() -> Reported:
    return Reported()


@pytest.fixture
def board() -> Board:
    return Board()


def worker(clock: FakeClock, board: Board, reported: Reported | None = None) -> Breakers:
    """The breakers of one worker of the node whose marks are on ``board``."""
    return Breakers(
        ADDRESSES, cool_off=COOL_OFF, probe_timeout=PROBE_TIMEOUT, clock=clock, observer=reported, shared=_typed(board)
    )


@pytest.fixture
def breakers(clock: FakeClock, board: Board, reported: Reported) -> Breakers:
    return worker(clock, board, reported)


def test_every_address_starts_closed_and_is_reported_reachable(breakers: Breakers, reported: Reported) -> None:
    assert breakers.usable(0) == [0, 1, 2]
    assert [breakers.until_probe(index) for index in range(3)] == [None, None, None]
    assert breakers.skipped() == []
    assert reported.states == [(address, True) for address in ADDRESSES]


def test_the_usable_addresses_start_at_the_preferred_one_and_wrap_around(breakers: Breakers) -> None:
    assert breakers.usable(1) == [1, 2, 0]
    assert breakers.usable(2) == [2, 0, 1]


def test_a_failure_skips_the_address_and_asks_for_one_probe_loop(breakers: Breakers, reported: Reported) -> None:
    assert breakers.failed(1, "DEADLINE_EXCEEDED") is True

    assert breakers.usable(0) == [0, 2]
    assert breakers.usable(1) == [2, 0]
    assert breakers.skipped() == ["c2:7000: DEADLINE_EXCEEDED, skipped until it answers a probe"]
    assert reported.states[-1] == ("c2:7000", False)
    # Calls in flight that fail too neither start another loop nor report again.
    assert breakers.failed(1, "UNAVAILABLE") is False
    assert breakers.skipped() == ["c2:7000: DEADLINE_EXCEEDED, skipped until it answers a probe"]
    assert reported.states.count(("c2:7000", False)) == 1


def test_with_every_address_open_nothing_is_usable(breakers: Breakers) -> None:
    for index in range(3):
        breakers.failed(index, "UNAVAILABLE")

    assert breakers.usable(0) == []
    assert len(breakers.skipped()) == 3


def test_the_first_probe_is_due_after_the_cool_off(breakers: Breakers, clock: FakeClock) -> None:
    breakers.failed(0, "DEADLINE_EXCEEDED")

    assert breakers.until_probe(0) == COOL_OFF
    clock.advance(0.4)
    assert breakers.until_probe(0) == pytest.approx(0.6)
    clock.advance(0.6)
    assert breakers.until_probe(0) == 0
    clock.advance(5)
    assert breakers.until_probe(0) == 0


def test_a_failed_probe_keeps_the_address_skipped_for_another_cool_off(breakers: Breakers, clock: FakeClock) -> None:
    breakers.failed(0, "DEADLINE_EXCEEDED")
    clock.advance(COOL_OFF)
    # The probe itself waited out its deadline.
    clock.advance(2.0)
    breakers.probe_failed(0, "UNAVAILABLE")

    assert breakers.until_probe(0) == COOL_OFF
    assert breakers.usable(0) == [1, 2]
    assert breakers.skipped() == ["c1:7000: UNAVAILABLE, skipped until it answers a probe"]


def test_an_answer_closes_the_breaker_and_ends_the_probe_loop(
    breakers: Breakers, clock: FakeClock, reported: Reported
) -> None:
    breakers.failed(2, "UNAVAILABLE")
    clock.advance(COOL_OFF)
    breakers.succeeded(2)

    assert breakers.usable(0) == [0, 1, 2]
    assert breakers.until_probe(2) is None
    assert reported.states[-2:] == [("c3:7000", False), ("c3:7000", True)]
    # An answer to a closed breaker reports nothing.
    breakers.succeeded(2)
    assert reported.states.count(("c3:7000", True)) == 2


def test_a_probe_that_fails_after_the_breaker_closed_changes_nothing(breakers: Breakers) -> None:
    breakers.failed(0, "UNAVAILABLE")
    breakers.succeeded(0)
    breakers.probe_failed(0, "DEADLINE_EXCEEDED")

    assert breakers.usable(0) == [0, 1, 2]


def test_a_breaker_that_opens_again_before_its_loop_ended_keeps_that_loop(breakers: Breakers) -> None:
    """Closed by a call while the probe loop slept: the loop has not seen it, so it goes on."""
    assert breakers.failed(0, "UNAVAILABLE") is True
    breakers.succeeded(0)
    assert breakers.failed(0, "DEADLINE_EXCEEDED") is False
    assert breakers.until_probe(0) == COOL_OFF


def test_a_breaker_that_opens_again_after_its_loop_ended_asks_for_a_new_one(breakers: Breakers) -> None:
    assert breakers.failed(0, "UNAVAILABLE") is True
    breakers.succeeded(0)
    assert breakers.until_probe(0) is None  # The loop sees it closed and ends.
    assert breakers.failed(0, "DEADLINE_EXCEEDED") is True


# Marks: what the other workers of the node learn.


def test_an_address_one_worker_found_down_is_skipped_by_the_others(clock: FakeClock, board: Board) -> None:
    first, second = worker(clock, board), worker(clock, board)
    first.failed(0, "DEADLINE_EXCEEDED")

    assert board.marks == {"c1:7000": clock() + HOLD}
    assert second.usable(0) == [1, 2]
    assert second.skipped() == ["c1:7000: skipped, another worker found it down"]
    # The other worker has no breaker of its own open, and so no probe loop.
    assert second.until_probe(0) is None


def test_a_failed_probe_renews_the_mark(clock: FakeClock, board: Board) -> None:
    first, second = worker(clock, board), worker(clock, board)
    first.failed(0, "DEADLINE_EXCEEDED")
    clock.advance(COOL_OFF + PROBE_TIMEOUT)
    first.probe_failed(0, "DEADLINE_EXCEEDED")

    assert board.marks == {"c1:7000": clock() + HOLD}
    clock.advance(COOL_OFF + PROBE_TIMEOUT)
    assert second.usable(0) == [1, 2]


def test_an_answer_removes_the_mark(clock: FakeClock, board: Board) -> None:
    first, second = worker(clock, board), worker(clock, board)
    first.failed(0, "UNAVAILABLE")
    first.succeeded(0)

    assert board.marks == {}
    assert second.usable(0) == [0, 1, 2]


def test_a_mark_whose_worker_stopped_renewing_it_lapses(clock: FakeClock, board: Board) -> None:
    first, second = worker(clock, board), worker(clock, board)
    first.failed(0, "UNAVAILABLE")
    clock.advance(HOLD)

    assert second.usable(0) == [0, 1, 2]


def test_a_mark_from_before_a_restart_of_the_machine_is_ignored(clock: FakeClock, board: Board) -> None:
    """The monotonic clock starts again at boot; a mark from the last boot may lie far ahead of it."""
    board.marks["c1:7000"] = clock() + 3600

    assert worker(clock, board).usable(0) == [0, 1, 2]


def test_marks_are_files_beside_the_cache(tmp_path, clock: FakeClock) -> None:
    layout = Layout(str(tmp_path))
    layout.create()
    marks = Marks(layout)
    first, second = (
        Breakers(ADDRESSES, cool_off=COOL_OFF, probe_timeout=PROBE_TIMEOUT, clock=clock, shared=marks) for _ in range(2)
    )
    first.failed(2, "UNAVAILABLE")

    assert marks.down_until("c3:7000") == clock() + HOLD
    assert [path.name.endswith(".down") for path in (tmp_path / "fills").iterdir()] == [True]
    assert second.usable(0) == [0, 1]
    first.succeeded(2)
    assert marks.down_until("c3:7000") is None
    assert list((tmp_path / "fills").iterdir()) == []
    assert second.usable(0) == [0, 1, 2]
    marks.clear("c3:7000")


def test_a_mark_that_cannot_be_read_counts_as_none(tmp_path) -> None:
    layout = Layout(str(tmp_path))
    layout.create()
    marks = Marks(layout)
    marks.mark_down("c1:7000", 12.5)
    (path,) = (tmp_path / "fills").iterdir()
    path.write_bytes(b"not a number")

    assert marks.down_until("c1:7000") is None
