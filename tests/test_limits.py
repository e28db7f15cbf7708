"""Bucket and LocalLimiter on a fake clock: their injected sleep advances the clock instead of waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from pipeline.limits import BURST_S, Bucket, LocalLimiter, roomiest


class FakeTime:
    """A clock that moves only when the code under test sleeps on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake() -> FakeTime:
    return FakeTime()


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=5))


async def starts(limiter: LocalLimiter, fake: FakeTime, n: int, tokens: int = 0) -> list[float]:
    """When each of n requests in a row was let go, on the fake clock."""
    marks = []
    for _ in range(n):
        await limiter.pace(tokens)
        marks.append(fake.now)
    return marks


def test_rpm_allows_a_burst_of_capacity_then_spaces_requests(fake: FakeTime) -> None:
    limiter = LocalLimiter(concurrency=1, requests_per_minute=6000, clock=fake, sleep=fake.sleep)
    capacity = 6000 / 60 * BURST_S  # 10 requests

    marks = run(starts(limiter, fake, 30))
    assert capacity == 10
    assert marks[:10] == [0.0] * 10  # the burst: nobody waited
    assert marks[10] == pytest.approx(0.01)
    gaps = [b - a for a, b in zip(marks[10:], marks[11:])]
    assert gaps == pytest.approx([0.01] * 19, abs=1e-9)


def test_rpm_rate_over_a_ten_second_window(fake: FakeTime) -> None:
    bucket = Bucket(per_s=100, capacity=100 * BURST_S, clock=fake, sleep=fake.sleep)

    async def main() -> int:
        taken = 0
        while True:
            await bucket.take(1)
            if fake.now > 10.0:
                return taken
            taken += 1

    expected = 100 * 10 + 10
    assert run(main()) == pytest.approx(expected, rel=0.01)


def test_token_request_larger_than_capacity_leaves_a_debt(fake: FakeTime) -> None:
    bucket = Bucket(per_s=10, capacity=100, clock=fake, sleep=fake.sleep)

    async def main() -> tuple[float, float]:
        await bucket.take(50)  # level 50
        await bucket.take(250)  # waits for a full bucket (5 s), then goes: level -150
        went_at = fake.now
        await bucket.take(10)  # waits for the debt plus its own 10: 160 / 10 = 16 s
        return went_at, fake.now

    went_at, next_at = run(main())
    assert went_at == pytest.approx(5.0)
    assert next_at == pytest.approx(5.0 + 16.0)


def test_bucket_settle_gives_back_and_charges(fake: FakeTime) -> None:
    bucket = Bucket(per_s=10, capacity=100, clock=fake, sleep=fake.sleep)

    async def over_reserved() -> None:
        await bucket.take(60)  # level 40
        bucket.settle(reserved=60, actual=20)  # level 80

    run(over_reserved())
    assert bucket.wait_s(80) == 0
    assert bucket.wait_s(81) == pytest.approx(0.1)

    async def under_reserved() -> None:
        await bucket.take(80)  # level 0
        bucket.settle(reserved=80, actual=110)  # level -30

    run(under_reserved())
    assert bucket.wait_s(10) == pytest.approx(4.0)


def test_settle_never_fills_beyond_capacity(fake: FakeTime) -> None:
    bucket = Bucket(per_s=10, capacity=100, clock=fake, sleep=fake.sleep)
    run(bucket.take(10))
    bucket.settle(reserved=500, actual=0)
    run(bucket.take(100))
    assert bucket.wait_s(1) == pytest.approx(0.1)  # empty again: the give-back stopped at 100


def test_limiter_settle_moves_the_next_token_wait(fake: FakeTime) -> None:
    # 6000 tokens/min = 100/s, capacity 10 tokens
    limiter = LocalLimiter(concurrency=1, tokens_per_minute=6000, clock=fake, sleep=fake.sleep)

    async def main() -> list[float]:
        marks = []
        await limiter.pace(10)  # level 0
        limiter.settle(10, 5)  # level 5
        await limiter.pace(10)  # waits 0.05 s
        marks.append(fake.now)
        limiter.settle(10, 40)  # level -30
        await limiter.pace(10)  # waits 0.4 s
        marks.append(fake.now)
        return marks

    assert run(main()) == pytest.approx([0.05, 0.45])


def test_cool_down_holds_the_next_pace(fake: FakeTime) -> None:
    limiter = LocalLimiter(concurrency=1, clock=fake, sleep=fake.sleep)

    async def main() -> None:
        limiter.cool_down(2.0)
        await limiter.pace(100)

    run(main())
    assert fake.now >= 2.0
    assert sum(fake.sleeps) == pytest.approx(2.0)


def test_cool_down_stops_a_request_already_waiting_in_the_bucket(fake: FakeTime) -> None:
    armed: list[bool] = []

    async def sleep(seconds: float) -> None:
        if armed == [True]:
            armed.append(True)
            limiter.cool_down(2.0)  # another sender's 429, while this one waits its turn
        await fake.sleep(seconds)

    limiter = LocalLimiter(concurrency=1, requests_per_minute=6000, clock=fake, sleep=sleep)  # 100/s

    async def main() -> list[float]:
        await starts(limiter, fake, 10)  # the burst allowance
        armed.append(True)
        return await starts(limiter, fake, 5)

    marks = run(main())
    assert marks[0] >= 2.0  # not at 0.01, inside the cool-down
    gaps = [b - a for a, b in zip(marks, marks[1:])]
    assert gaps == pytest.approx([0.01] * 4, abs=1e-6)  # then at the rate, not as a burst


def test_shorter_later_cool_down_does_not_shorten_it(fake: FakeTime) -> None:
    limiter = LocalLimiter(concurrency=1, requests_per_minute=60_000, clock=fake, sleep=fake.sleep)

    async def main() -> None:
        limiter.cool_down(2.0)  # until t = 2.0
        fake.now = 0.5
        limiter.cool_down(0.5)  # until t = 1.0: must not win
        await limiter.pace(1)

    run(main())  # then one request's spacing (1 ms), since the allowance starts empty after a pause
    assert fake.now == pytest.approx(2.001)
    assert sum(fake.sleeps) == pytest.approx(1.501)


def test_longer_later_cool_down_extends_it(fake: FakeTime) -> None:
    limiter = LocalLimiter(concurrency=1, clock=fake, sleep=fake.sleep)

    async def main() -> None:
        limiter.cool_down(1.0)
        fake.now = 0.5
        limiter.cool_down(3.0)  # until t = 3.5
        await limiter.pace(1)

    run(main())
    assert fake.now == pytest.approx(3.5)


def test_pace_without_limits_does_not_wait(fake: FakeTime) -> None:
    limiter = LocalLimiter(concurrency=4, clock=fake, sleep=fake.sleep)

    async def main() -> None:
        for _ in range(1000):
            await limiter.pace(1_000_000)

    run(main())
    assert fake.sleeps == []


def test_concurrency_bounds_slot_holders() -> None:
    limiter = LocalLimiter(concurrency=3)
    holding: set[int] = set()
    most = 0
    entered = {i: asyncio.Event() for i in range(6)}
    release = {i: asyncio.Event() for i in range(6)}

    async def worker(i: int) -> None:
        nonlocal most
        async with limiter.slot():
            holding.add(i)
            most = max(most, len(holding))
            entered[i].set()
            await release[i].wait()
            holding.discard(i)

    async def main() -> None:
        tasks = [asyncio.create_task(worker(i)) for i in range(6)]
        await asyncio.gather(*(entered[i].wait() for i in range(3)))
        # every task has run up to its slot by now: 0-2 hold one, 3-5 are queued
        assert holding == {0, 1, 2}
        assert not any(entered[i].is_set() for i in range(3, 6))
        for done, waiting in ((0, 3), (1, 4), (2, 5)):
            release[done].set()
            await entered[waiting].wait()
            assert len(holding) == 3 and done not in holding
        for i in range(3, 6):
            release[i].set()
        await asyncio.gather(*tasks)

    run(main())
    assert most == 3
    assert holding == set()


def test_a_settle_during_a_pause_does_not_end_it(fake: FakeTime) -> None:
    bucket = Bucket(per_s=100, capacity=10, clock=fake, sleep=fake.sleep)

    async def main() -> None:
        bucket.pause(until=2.0)
        bucket.settle(reserved=50, actual=0)  # an answer that used less than it reserved
        assert bucket.wait_s(1) >= 2.0
        await bucket.take(1)

    run(main())
    assert fake.now >= 2.0


def test_roomiest_is_the_soonest_then_the_freest_then_the_first() -> None:
    assert roomiest([0.5, 0.0, 0.0], [9, 1, 3]) == 2
    assert roomiest([0.0, 0.0], [2, 2]) == 0
    assert roomiest([1.0, 3.0], [0, 8]) == 0


def test_stated_limits_only_ever_lower_ours(fake: FakeTime) -> None:
    limiter = LocalLimiter(concurrency=1, requests_per_minute=6000, clock=fake, sleep=fake.sleep)  # 100/s

    async def main() -> tuple[list[float], list[float]]:
        await starts(limiter, fake, 10)  # the burst allowance
        limiter.lower(600, None)  # the provider says 10/s
        slowed = await starts(limiter, fake, 5)
        limiter.lower(60_000, None)  # a higher stated limit changes nothing
        return slowed, await starts(limiter, fake, 5)

    slowed, still = run(main())
    assert [b - a for a, b in zip(slowed, slowed[1:])] == pytest.approx([0.1] * 4)
    assert [b - a for a, b in zip(still, still[1:])] == pytest.approx([0.1] * 4)


def test_a_stated_limit_applies_where_we_had_none(fake: FakeTime) -> None:
    limiter = LocalLimiter(concurrency=1, clock=fake, sleep=fake.sleep)

    limiter.lower(None, 60_000)  # 1,000 tokens a second, 100 of them at once
    assert run(starts(limiter, fake, 3, tokens=100)) == pytest.approx([0.0, 0.1, 0.2])


def test_a_newcomer_waits_behind_those_already_in_line(fake: FakeTime) -> None:
    gate = asyncio.Event()

    async def sleep(seconds: float) -> None:  # the clock moves, and the sleeper stays asleep until the gate opens
        fake.now += seconds
        await gate.wait()

    bucket = Bucket(per_s=10, capacity=1, clock=fake, sleep=sleep)

    async def main() -> float:
        await bucket.take(1)  # empty now
        waiting = [asyncio.create_task(bucket.take(1)) for _ in range(3)]
        for _ in range(3):
            await asyncio.sleep(0)  # the first sleeps at t = 0.1 with its turn; two are in line behind it
        ahead = bucket.wait_s(1)
        gate.set()
        await asyncio.gather(*waiting)
        return ahead

    assert run(main()) == pytest.approx(0.3)  # the three take at 0.1, 0.2 and 0.3; a newcomer at 0.4
