"""The rate-limit budget: its header parsers, when it pauses, and how its workers share the pause."""

from __future__ import annotations

import email.utils
import random
from collections import Counter
from pathlib import Path

import pytest

from node.budget import DEFAULT_PAUSE, LOW, MAX_PAUSE, REFUSED, Budget, parse_count, parse_reset, parse_retry_after
from node.config import UpstreamConfig
from testbed.clock import FakeClock

NOW = 1_700_000_000.0


def http_date(moment: float) -> str:
    return email.utils.formatdate(moment, usegmt=True)


# Parsers.


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("76;w=21600", (76, 21600.0)),
        ("76", (76, None)),
        (" 76 ; w = 60 ", (76, 60.0)),
        ("0;w=3600", (0, 3600.0)),
        ("76;w=21600, 75;w=21600", (76, 21600.0)),
        ("76;comment=x;w=10", (76, 10.0)),
        (None, (None, None)),
        ("", (None, None)),
        ("many", (None, None)),
        ("-5;w=60", (None, 60.0)),
        ("7.5", (None, None)),
        ("1e9", (None, None)),
        ("76;w=soon", (76, None)),
        ("76;w=-1", (76, None)),
        ("9" * 5000, (None, None)),
        ("76;w=" + "9" * 5000, (76, None)),
        ("\x00\xff;;;", (None, None)),
    ],
)
def test_parse_count(value: str | None, parsed: tuple[int | None, float | None]) -> None:
    assert parse_count(value) == parsed


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        (http_date(NOW + 90), 90.0),
        (http_date(NOW - 90), 0.0),
        (email.utils.formatdate(NOW + 30), 30.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("-1", None),
        ("1.5", None),
        ("9" * 5000, None),
        ("Wed, 99 Foo 2015 07:28:00 GMT", None),
        ("Fri, 31 Dec 99999 23:59:59 GMT", None),
        ("x" * 10_000, None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30", 30.0),
        (str(int(NOW) + 45), 45.0),
        (str(int(NOW) - 45), 0.0),
        (None, None),
        ("later", None),
        ("-3", None),
        ("9" * 5000, None),
    ],
)
def test_parse_reset(value: str | None, seconds: float | None) -> None:
    assert parse_reset(value, NOW) == seconds


def test_no_header_value_makes_the_parsers_or_the_budget_raise(clock: FakeClock) -> None:
    budget = Budget(UpstreamConfig(), clock=clock)
    chooser = random.Random("hostile headers")
    alphabet = "0123456789;=,-+. wWGMTFriDecJan:\x00\xff\u2603e"
    for _ in range(3000):
        value = "".join(chooser.choice(alphabet) for _ in range(chooser.randint(0, 40)))
        parse_count(value)
        parse_reset(value, NOW)
        parse_retry_after(value, NOW)
        headers = {"retry-after": value, "ratelimit-remaining": value, "ratelimit-reset": value}
        budget.record(chooser.choice((200, 429)), headers)
        assert 0 <= budget.paused() <= MAX_PAUSE


# Pausing.


class Counts:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, counter: str, value: int = 1) -> None:
        self.counts[counter] += value


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def counts() -> Counts:
    return Counts()


@pytest.fixture
def budget(clock: FakeClock, counts: Counts) -> Budget:
    return Budget(UpstreamConfig(name="docker.io", ratelimit_floor=10), clock=clock, observer=counts)


def test_no_rate_limit_headers_never_pause(budget: Budget) -> None:
    budget.record(200, {})
    budget.record(404, {"content-type": "application/json"})
    assert budget.paused() == 0


def test_429_pauses_for_retry_after_then_resumes(budget: Budget, clock: FakeClock, counts: Counts) -> None:
    budget.record(429, {"retry-after": "120", "ratelimit-remaining": "0;w=21600"})
    assert budget.paused() == 120
    clock.advance(119)
    assert budget.paused() == 1
    clock.advance(1)
    assert budget.paused() == 0
    assert counts.counts == {f"budget_pauses.{REFUSED}.docker.io": 1}


def test_429_with_an_http_date(budget: Budget) -> None:
    budget.record(429, {"retry-after": http_date(NOW + 300)})
    assert budget.paused() == 300


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        # Retry-After first, then ratelimit-reset, then the window, then the default.
        ({"retry-after": "30", "ratelimit-reset": "90", "ratelimit-remaining": "0;w=600"}, 30),
        ({"ratelimit-reset": "90", "ratelimit-remaining": "0;w=600"}, 90),
        ({"ratelimit-remaining": "0;w=600"}, 600),
        ({"ratelimit-limit": "100;w=900"}, 900),
        ({}, DEFAULT_PAUSE),
        # Docker Hub's six-hour window, and hostile values, stop at the cap.
        ({"ratelimit-remaining": "0;w=21600"}, MAX_PAUSE),
        ({"retry-after": "999999999999"}, MAX_PAUSE),
        ({"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}, MAX_PAUSE),
        ({"ratelimit-reset": str(10**14)}, MAX_PAUSE),
        # Malformed values are ignored, as if absent.
        ({"retry-after": "soon", "ratelimit-remaining": "none;w=forever"}, DEFAULT_PAUSE),
        ({"retry-after": "9" * 5000}, DEFAULT_PAUSE),
    ],
)
def test_how_long_a_429_pauses(budget: Budget, headers: dict[str, str], seconds: float) -> None:
    budget.record(429, headers)
    assert budget.paused() == seconds


def test_retry_after_zero_does_not_pause(budget: Budget) -> None:
    budget.record(429, {"retry-after": "0"})
    assert budget.paused() == 0


def test_remaining_below_the_floor_pauses_until_it_recovers(budget: Budget, clock: FakeClock, counts: Counts) -> None:
    budget.record(200, {"ratelimit-remaining": "10;w=21600"})
    assert budget.paused() == 0
    budget.record(200, {"ratelimit-remaining": "9;w=21600"})
    # Not the six-hour window: the next check (a HEAD) looks again soon.
    assert budget.paused() == DEFAULT_PAUSE
    clock.advance(10)
    # Answers still below the floor keep the pause going.
    budget.record(200, {"ratelimit-remaining": "8;w=21600"})
    assert budget.paused() == DEFAULT_PAUSE
    # An answer at the floor ends it at once.
    budget.record(200, {"ratelimit-remaining": "10;w=21600"})
    assert budget.paused() == 0
    assert counts.counts == {f"budget_pauses.{LOW}.docker.io": 1}


def test_a_low_pause_lasts_until_ratelimit_reset(budget: Budget) -> None:
    budget.record(200, {"ratelimit-remaining": "2", "ratelimit-reset": "240"})
    assert budget.paused() == 240


def test_a_refused_pause_is_not_ended_by_a_good_count(budget: Budget, counts: Counts) -> None:
    budget.record(200, {"ratelimit-remaining": "3"})
    budget.record(429, {"retry-after": "30"})
    # The 429 turned the pause into a refusal: it keeps the longer end.
    assert budget.paused() == DEFAULT_PAUSE
    budget.record(200, {"ratelimit-remaining": "50"})
    assert budget.paused() == DEFAULT_PAUSE
    assert counts.counts == {f"budget_pauses.{LOW}.docker.io": 1, f"budget_pauses.{REFUSED}.docker.io": 1}


def test_floor_zero_turns_the_floor_off(clock: FakeClock) -> None:
    budget = Budget(UpstreamConfig(ratelimit_floor=0), clock=clock)
    budget.record(200, {"ratelimit-remaining": "0;w=21600"})
    assert budget.paused() == 0
    # A refusal still pauses.
    budget.record(429, {"retry-after": "5"})
    assert budget.paused() == 5


def test_skipped_tag_checks_are_counted(budget: Budget, counts: Counts) -> None:
    budget.skipped_tag_check()
    budget.skipped_tag_check()
    assert counts.counts["tag_checks_skipped.docker.io"] == 2


# Sharing between the workers of a node.


def test_workers_share_the_pause_through_the_file(tmp_path: Path, clock: FakeClock) -> None:
    path = str(tmp_path / "docker.io.json")
    config = UpstreamConfig(ratelimit_floor=10)
    one, other = Budget(config, path, clock=clock), Budget(config, path, clock=clock)
    assert other.paused() == 0
    one.record(429, {"retry-after": "30"})
    assert other.paused() == 30
    other.record(200, {"ratelimit-remaining": "4", "ratelimit-reset": "10"})
    # The floor pause is shorter than the refusal: the refusal stands.
    assert one.paused() == 30
    clock.advance(30)
    assert one.paused() == other.paused() == 0


def test_a_low_pause_ended_by_one_worker_ends_for_all(tmp_path: Path, clock: FakeClock) -> None:
    path = str(tmp_path / "docker.io.json")
    config = UpstreamConfig(ratelimit_floor=10)
    one, other = Budget(config, path, clock=clock), Budget(config, path, clock=clock)
    one.record(200, {"ratelimit-remaining": "1"})
    assert other.paused() == DEFAULT_PAUSE
    other.record(200, {"ratelimit-remaining": "90"})
    assert one.paused() == 0


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[]",
        b'{"until": "soon", "reason": "429"}',
        b'{"until": 1e400, "reason": "429"}',
        b'{"until": true, "reason": "429"}',
        b'{"until": 1700000030, "reason": "bored"}',
        # Further away than any pause may be: a clock stepped back, or a hand edit.
        b'{"until": 1800000000, "reason": "429"}',
        b'{"until": 1700000030, "reason": "429"}' + b" " * 1000,
    ],
)
def test_a_damaged_pause_file_means_no_pause(tmp_path: Path, clock: FakeClock, content: bytes) -> None:
    path = tmp_path / "docker.io.json"
    path.write_bytes(content)
    budget = Budget(UpstreamConfig(), str(path), clock=clock)
    assert budget.paused() == 0
    # And it is replaced by the next pause.
    budget.record(429, {"retry-after": "7"})
    assert budget.paused() == 7
