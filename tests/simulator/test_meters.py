"""The simulator's meters, driven with explicit times: each enforces a per-minute limit the way
one kind of provider documents it."""

from __future__ import annotations

import pytest

from pipeline.simulator.meters import Bucket, FixedWindow, SlidingWindow, meter


def admitted(m: SlidingWindow | FixedWindow | Bucket, times: list[float], cost: float = 1) -> list[float]:
    """The times at which a request arriving at each of `times` was let through (refused ones are
    counted, as OpenAI counts them, only when the caller takes them)."""
    passed = []
    for now in times:
        if m.wait_s(cost, now) == 0:
            m.take(cost, now)
            passed.append(now)
    return passed


def test_a_sliding_window_holds_limit_over_60_in_any_second() -> None:
    window = SlidingWindow(6000, 1.0)  # 100 in any second
    arrivals = [k * 0.001 for k in range(3000)]  # 1,000 a second for 3 s
    passed = admitted(window, arrivals)
    for start in passed:  # every window that opens on an admitted request
        assert sum(start <= t < start + 1.0 for t in passed) <= 100
    assert len(passed) == 300


def test_a_sliding_window_refuses_the_burst_a_one_second_bucket_forgives() -> None:
    # evenly at the limit for a second, then ten more at once: the window is already full
    steady = [k / 100 for k in range(100)]
    window, bucket = SlidingWindow(6000, 1.0), Bucket(6000)
    assert admitted(window, steady) == steady and admitted(bucket, steady) == steady
    burst = [1.0] * 10
    assert len(admitted(window, burst)) == 1  # only the request of t=0 has left the window
    assert len(admitted(bucket, burst)) >= 9  # a bucket of one second's allowance lets them go


def test_a_sliding_window_names_when_room_comes() -> None:
    window = SlidingWindow(60, 10.0)  # 10 in any ten seconds
    for k in range(10):
        window.take(1, k * 0.5)
    assert window.wait_s(1, 5.0) == pytest.approx(5.0)  # the first leaves at t = 10
    assert window.wait_s(1, 10.0) == 0
    assert window.wait_s(11, 10.0) == 10.0  # larger than the window: never fits


def test_a_neighbour_takes_its_share_of_every_window() -> None:
    window = SlidingWindow(6000, 1.0, neighbour=1500)  # 75 of 100 a second are left
    assert len(admitted(window, [k * 0.001 for k in range(1000)])) == 75


def test_a_fixed_minute_resets_at_the_whole_minute() -> None:
    minute = FixedWindow(120, 60.0)  # 120 a minute, counted per clock minute
    late = [60 * 100 + 50 + k * 0.01 for k in range(200)]  # 200 requests 10 s before a minute ends
    assert len(admitted(minute, late)) == 120
    assert minute.wait_s(1, 60 * 100 + 59.0) == pytest.approx(1.0)
    assert minute.wait_s(1, 60 * 101) == 0  # the next minute starts from nothing


def test_a_fixed_window_neighbour_has_used_its_share_so_far() -> None:
    minute = FixedWindow(120, 60.0, neighbour=60)
    start = 60 * 7
    assert len(admitted(minute, [start + 30.0] * 200)) == 90  # half-way: the neighbour used 30


def test_a_bucket_refills_at_what_the_neighbour_leaves() -> None:
    bucket = Bucket(600, neighbour=300)  # capacity 10, refilled at 5 a second
    assert len(admitted(bucket, [0.0] * 20)) == 10
    assert bucket.wait_s(1, 0.0) == pytest.approx(0.2)


@pytest.mark.parametrize(("mode", "kind"), [("window", SlidingWindow), ("fixed_minute", FixedWindow),
                                             ("bucket", Bucket)])
def test_meter_by_mode(mode: str, kind: type) -> None:
    made = meter(mode, 600, None, 0)
    assert isinstance(made, kind)
    if isinstance(made, (SlidingWindow, FixedWindow)):
        assert made.window_s == (1.0 if mode == "window" else 60.0)
