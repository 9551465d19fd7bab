"""The floor under an upstream transfer's rate (node/min_rate.py), on the fake clock."""

from __future__ import annotations

import pytest

from node.errors import UpstreamTooSlow
from node.min_rate import MinRate
from testbed.clock import FakeClock

RATE = 10 * 1024
WINDOW = 30.0


def floor(clock: FakeClock, rate: int = RATE) -> MinRate:
    return MinRate(rate, WINDOW, "upstream http://registry.test: blob app@sha256:ab", {"digest": "x"}, clock)


def test_a_window_that_brings_enough_bytes_passes_and_the_next_window_starts_afresh() -> None:
    clock = FakeClock()
    meter = floor(clock)
    for _ in range(3):
        clock.advance(WINDOW / 2)
        meter.add(int(RATE * WINDOW / 2))
    # The second window has had half its time and half its bytes so far: not judged yet.
    clock.advance(WINDOW / 2 - 1)
    meter.add(1)


def test_a_drip_is_aborted_at_the_first_read_after_its_window() -> None:
    clock = FakeClock()
    meter = floor(clock)
    for _ in range(29):
        clock.advance(1)
        meter.add(1024)
    clock.advance(1)
    with pytest.raises(UpstreamTooSlow) as raised:
        meter.add(1024)
    assert "1024 bytes/s over the last 30.0 s, below upstream.min_rate (10240 bytes/s)" in raised.value.message
    assert raised.value.for_the_cluster
    assert raised.value.status == 503 and raised.value.code == "UPSTREAM_UNAVAILABLE"


def test_a_fast_start_does_not_pay_for_a_stall_in_a_later_window() -> None:
    clock = FakeClock()
    meter = floor(clock)
    meter.add(100 * RATE * int(WINDOW))
    clock.advance(WINDOW)
    meter.add(1)
    clock.advance(WINDOW)
    with pytest.raises(UpstreamTooSlow):
        meter.add(1)


def test_no_floor_when_the_rate_is_zero() -> None:
    clock = FakeClock()
    meter = floor(clock, rate=0)
    clock.advance(10 * WINDOW)
    meter.add(1)
