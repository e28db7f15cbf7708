"""Pace and LocalLimiter on a fake clock (their injected sleep advances the clock instead of
waiting), held to the simulator's strict meters: a sliding window of one or ten seconds and a
fixed minute, as providers enforce limits."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from pipeline.limits import (
    CATCH_UP_S,
    CATCH_UP_TOKENS_S,
    CUT,
    GROWTH_PER_S,
    HEADROOM,
    MEASURE_S,
    LocalLimiter,
    Pace,
    roomiest,
)
from pipeline.simulator.meters import FixedWindow, Meter, SlidingWindow


class FakeTime:
    """A clock that moves only when the code under test sleeps on it."""

    def __init__(self, late_s: float = 0.0) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.late_s = late_s  # every wake-up comes this late, as on a busy event loop

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds + self.late_s


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



class Server:
    """A provider's meters for requests and tokens on the fake clock; refused requests count."""

    def __init__(self, requests: Meter | None = None, tokens: Meter | None = None) -> None:
        self.meters = [(m, kind) for m, kind in ((requests, "requests"), (tokens, "tokens")) if m is not None]
        self.accepted: list[tuple[float, int]] = []
        self.refused: list[float] = []

    def ask(self, now: float, tokens: int = 0) -> float:
        """0 when the request is let through, else the wait the provider names."""
        costs = {"requests": 1, "tokens": tokens}
        wait = max((m.wait_s(costs[kind], now) for m, kind in self.meters), default=0.0)
        for m, kind in self.meters:
            m.take(costs[kind], now)
        (self.refused.append(now) if wait else self.accepted.append((now, tokens)))
        return wait

    def rate(self, since: float, until: float) -> float:
        return sum(1 for t, _ in self.accepted if since <= t < until) / (until - since)

    def token_rate(self, since: float, until: float) -> float:
        return sum(n for t, n in self.accepted if since <= t < until) / (until - since)


async def send(limiter: LocalLimiter, server: Server, fake: FakeTime, until: float, tokens: list[int] | None = None,
               stall_at: float | None = None, retry_after: bool = True) -> None:
    """One sender after another until `until` on the fake clock, each telling the limiter of a 429."""
    k = 0
    while fake.now < until:
        cost = tokens[k % len(tokens)] if tokens else 0
        turn = await limiter.pace(cost)
        if wait := server.ask(fake.now, cost):
            limiter.refused(wait if retry_after else None, turn.epoch)
        else:
            limiter.answered(cost, cost)
        k += 1
        if stall_at is not None and fake.now >= stall_at:
            fake.now += 0.3  # the process was stopped for 0.3 s
            stall_at = None


@pytest.mark.parametrize("window", [(SlidingWindow, 1.0), (SlidingWindow, 10.0), (FixedWindow, 60.0)],
                         ids=["window-1s", "window-10s", "fixed-minute"])
@pytest.mark.parametrize("late_s", [0.0, 0.002], ids=["on-time", "late-wakeups"])
def test_requests_at_the_limit_pass_every_window(window: tuple[type[SlidingWindow | FixedWindow], float],
                                                 late_s: float) -> None:
    fake = FakeTime(late_s)
    limiter = LocalLimiter(concurrency=1, requests_per_minute=6000, clock=fake, sleep=fake.sleep)
    kind, window_s = window
    server = Server(requests=kind(6000, window_s))
    run(send(limiter, server, fake, until=130.0))
    assert server.refused == []
    assert server.rate(0, 120) >= 0.97 * 100


def test_no_burst_at_the_start_the_first_waits_its_own_share(fake: FakeTime) -> None:
    limiter = LocalLimiter(concurrency=1, requests_per_minute=6000, clock=fake, sleep=fake.sleep)
    marks = run(starts(limiter, fake, 5))
    gap = 1 / (100 * HEADROOM)
    assert marks == pytest.approx([gap * (k + 1) for k in range(5)])


def test_after_a_stall_it_catches_up_only_as_far_as_the_window_allows() -> None:
    fake = FakeTime()
    limiter = LocalLimiter(concurrency=1, requests_per_minute=6000, clock=fake, sleep=fake.sleep)
    server = Server(requests=SlidingWindow(6000, 1.0))
    run(send(limiter, server, fake, until=5.0, stall_at=2.0))
    assert server.refused == []
    stalled = next(t for t, _ in server.accepted if t >= 2.0) + 0.3
    soon = [t for t, _ in server.accepted if stalled <= t < stalled + 0.1]
    assert len(soon) <= (0.1 + CATCH_UP_S) * 100 * HEADROOM + 1  # the stall is not made up in a burst


@pytest.mark.parametrize("window_s", [1.0, 10.0])
def test_tokens_of_mixed_sizes_at_the_limit_pass_every_window(fake: FakeTime, window_s: float) -> None:
    tpm = 6_000_000  # 100,000 a second
    limiter = LocalLimiter(concurrency=1, tokens_per_minute=tpm, clock=fake, sleep=fake.sleep)
    server = Server(tokens=SlidingWindow(tpm, window_s))
    sizes = [350, 1_200, 600, 2_900, 90, 1_750]  # small and large images, with max_tokens
    run(send(limiter, server, fake, until=70.0, tokens=sizes))
    assert server.refused == []
    assert server.token_rate(0, 60) >= 0.97 * 100_000


def test_a_request_that_left_late_is_counted_from_when_it_left(fake: FakeTime) -> None:
    pace = Pace(per_s=1000, clock=fake, sleep=fake.sleep)  # a second's window holds 1,000 tokens at most

    async def main() -> float:
        first = await pace.take(990)
        fake.now = 0.5  # it waited for a connection, and its headers went out only now
        pace.restamp(first)
        fake.now = 1.2  # a second after it was paced, not yet a second after it left
        await pace.take(100)
        return fake.now

    left_at = run(main())
    assert left_at >= 0.5 + 1.0  # it waits until the late one has left the window


def test_a_refusal_cuts_the_pace_to_a_share_of_what_was_sent(fake: FakeTime) -> None:
    limiter = LocalLimiter(concurrency=1, requests_per_minute=6000, clock=fake, sleep=fake.sleep)
    run(starts(limiter, fake, 300))  # 3 s at 98/s
    limiter.answered(0, 0)
    epoch = run(limiter.pace(0)).epoch
    limiter.refused(1.0, epoch)
    held = limiter.held()
    assert held is not None and held.kind == "requests"
    assert held.per_minute == pytest.approx(CUT * 6000 * HEADROOM, rel=0.02)  # 90% of what was sent
    assert "held at" in str(held) and "of 6,000" in str(held)
    limiter.refused(1.0, epoch)  # paced before the cut: it says nothing new
    assert limiter.held() == held or limiter.held().per_minute == pytest.approx(held.per_minute)  # type: ignore[union-attr]


def test_a_refusal_with_nothing_answered_since_the_last_pauses_everyone(fake: FakeTime) -> None:
    limiter = LocalLimiter(concurrency=1, requests_per_minute=6000, clock=fake, sleep=fake.sleep)
    run(starts(limiter, fake, 100))
    limiter.answered(0, 0)
    limiter.refused(5.0, run(limiter.pace(0)).epoch)  # a cut; the provider asks for 5 s, but only that request waits
    at = fake.now
    second = run(limiter.pace(0)).epoch
    assert fake.now - at < 0.2
    limiter.refused(5.0, second)  # refused again, nothing answered since: it is closed for now
    refused_at = fake.now
    run(limiter.pace(0))
    assert fake.now >= refused_at + 5.0


def test_with_no_wait_named_a_closed_provider_is_given_doubling_pauses(fake: FakeTime) -> None:
    limiter = LocalLimiter(concurrency=1, clock=fake, sleep=fake.sleep)
    run(starts(limiter, fake, 10))
    limiter.answered(0, 0)
    pauses = []
    for _ in range(5):
        epoch = run(limiter.pace(0)).epoch
        at = fake.now
        limiter.refused(None, epoch)
        run(limiter.pace(0))
        pauses.append(fake.now - at)
    assert pauses[0] < 0.2  # the first is a cut
    assert pauses[1:] == pytest.approx([1.0, 2.0, 4.0, 8.0], abs=0.15)  # and a pace interval after each


def test_the_pace_regrows_after_a_cut_up_to_the_configured_limit(fake: FakeTime) -> None:
    limiter = LocalLimiter(concurrency=1, requests_per_minute=6000, clock=fake, sleep=fake.sleep)
    run(starts(limiter, fake, 300))
    limiter.answered(0, 0)
    limiter.refused(None, run(limiter.pace(0)).epoch)
    cut_at = fake.now
    run(send(limiter, Server(), fake, until=cut_at + MEASURE_S + 1.0))
    held = limiter.held()
    assert held is not None
    expected = CUT * 98 * 60 * (1 + GROWTH_PER_S)  # a second of growth once MEASURE_S has passed
    assert held.per_minute == pytest.approx(expected, rel=0.02)
    run(send(limiter, Server(), fake, until=cut_at + 60.0))
    assert limiter.held() is None  # back at the configured limit, and no higher


@pytest.mark.parametrize("retry_after", [True, False], ids=["retry-after", "no-retry-after"])
@pytest.mark.parametrize("meter", ["window", "fixed"])
def test_an_unstated_lower_limit_is_found(fake: FakeTime, retry_after: bool, meter: str) -> None:
    limiter = LocalLimiter(concurrency=1, requests_per_minute=6000, clock=fake, sleep=fake.sleep)
    real = SlidingWindow(3000, 1.0) if meter == "window" else FixedWindow(3000, 60.0)  # half the configured
    server = Server(requests=real)
    run(send(limiter, server, fake, until=180.0, retry_after=retry_after))
    assert server.rate(60, 180) >= 0.9 * 50
    assert len(server.refused) <= 0.02 * (len(server.accepted) + len(server.refused))


def test_a_neighbour_is_made_room_for_and_its_share_taken_back_when_it_stops(fake: FakeTime) -> None:
    limiter = LocalLimiter(concurrency=1, requests_per_minute=6000, clock=fake, sleep=fake.sleep)
    server = Server(requests=SlidingWindow(6000, 1.0, neighbour=1500))  # 75 a second are left
    run(send(limiter, server, fake, until=120.0))
    assert server.rate(30, 120) >= 0.9 * 75
    assert len(server.refused) <= 0.02 * len(server.accepted)
    stopped = fake.now
    server.meters = [(SlidingWindow(6000, 1.0), "requests")]  # the neighbour stops
    run(send(limiter, server, fake, until=stopped + 60.0))
    assert server.rate(stopped + 55, stopped + 60) >= 0.9 * 100


def test_settle_gives_back_and_charges(fake: FakeTime) -> None:
    pace = Pace(per_s=100, clock=fake, sleep=fake.sleep)

    async def main() -> list[float]:
        marks = []
        await pace.take(10)  # waits 0.1 s for its own share
        pace.settle(reserved=10, actual=5)  # the next may start sooner, by CATCH_UP_TOKENS_S at most
        await pace.take(10)
        marks.append(fake.now)
        pace.settle(reserved=10, actual=40)  # the next starts 0.3 s later
        await pace.take(10)
        marks.append(fake.now)
        return marks

    sooner = 0.1 - CATCH_UP_TOKENS_S + 0.1
    assert run(main()) == pytest.approx([sooner, sooner + 0.3 + 0.1])


def test_a_pause_stops_a_request_already_waiting_its_turn(fake: FakeTime) -> None:
    armed: list[bool] = []

    async def sleep(seconds: float) -> None:
        if armed == [True]:
            armed.append(True)
            limiter._pause(2.0)  # another sender's 429 that means it, while this one waits its turn
        await fake.sleep(seconds)

    limiter = LocalLimiter(concurrency=1, requests_per_minute=6000, clock=fake, sleep=sleep)

    async def main() -> list[float]:
        await starts(limiter, fake, 10)
        armed.append(True)
        return await starts(limiter, fake, 5)

    marks = run(main())
    gap = 1 / (100 * HEADROOM)
    assert marks[0] == pytest.approx(2.0 + gap)  # not inside the pause, and its own share after it
    assert [b - a for a, b in zip(marks, marks[1:])] == pytest.approx([gap] * 4, abs=1e-6)  # no burst


def test_a_later_shorter_pause_does_not_shorten_it(fake: FakeTime) -> None:
    limiter = LocalLimiter(concurrency=1, clock=fake, sleep=fake.sleep)
    limiter._pause(2.0)
    limiter._pause(1.0)
    run(limiter.pace(1))
    assert fake.now == pytest.approx(2.0)


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
    pace = Pace(per_s=100, clock=fake, sleep=fake.sleep)

    async def main() -> None:
        pace.pause(until=2.0)
        pace.settle(reserved=50, actual=0)  # an answer that used less than it reserved
        await pace.take(1)

    run(main())
    assert fake.now >= 2.0


def test_roomiest_is_the_soonest_then_the_freest_then_the_first() -> None:
    assert roomiest([0.5, 0.0, 0.0], [9, 1, 3]) == 2
    assert roomiest([0.0, 0.0], [2, 2]) == 0
    assert roomiest([1.0, 3.0], [1, 8]) == 0
    assert roomiest([1.0, 3.0], [0, 8]) == 1  # no free slot: its pace's line says nothing of the wait


def test_stated_limits_only_ever_lower_ours(fake: FakeTime) -> None:
    limiter = LocalLimiter(concurrency=1, requests_per_minute=6000, clock=fake, sleep=fake.sleep)  # 100/s

    async def main() -> tuple[list[float], list[float], list[float]]:
        fast = await starts(limiter, fake, 10)
        limiter.lower(600, None)  # the provider says 10/s
        slowed = await starts(limiter, fake, 5)
        limiter.lower(60_000, None)  # a higher stated limit changes nothing
        return fast, slowed, await starts(limiter, fake, 5)

    fast, slowed, still = run(main())
    gap = 1 / (10 * HEADROOM)
    assert slowed[0] >= fast[0] + 1.0  # the second that holds the 10 sent at 100/s passes first
    assert [b - a for a, b in zip(slowed, slowed[1:])] == pytest.approx([gap] * 4, abs=CATCH_UP_S)
    assert [b - a for a, b in zip(still, still[1:])] == pytest.approx([gap] * 4, abs=CATCH_UP_S)
    assert limiter.held() is None  # a stated limit is a limit, not a hold


def test_a_stated_limit_applies_where_we_had_none(fake: FakeTime) -> None:
    limiter = LocalLimiter(concurrency=1, clock=fake, sleep=fake.sleep)

    limiter.lower(None, 60_000)  # 1,000 tokens a second
    gap = 0.1 / HEADROOM
    assert run(starts(limiter, fake, 3, tokens=100)) == pytest.approx([gap, 2 * gap, 3 * gap])


def test_a_newcomer_waits_behind_those_already_in_line(fake: FakeTime) -> None:
    gate = asyncio.Event()

    async def sleep(seconds: float) -> None:  # the clock moves, and the sleeper stays asleep until the gate opens
        fake.now += seconds
        await gate.wait()

    pace = Pace(per_s=10, clock=fake, sleep=sleep)

    async def main() -> float:
        waiting = [asyncio.create_task(pace.take(1)) for _ in range(3)]
        for _ in range(3):
            await asyncio.sleep(0)  # the first sleeps with its turn until 0.1; two are in line behind it
        ahead = pace.wait_s(1)
        gate.set()
        await asyncio.gather(*waiting)
        return ahead

    assert run(main()) == pytest.approx(0.4 - CATCH_UP_TOKENS_S)  # they take at 0.1, 0.2, 0.3; a newcomer at 0.4


def test_requests_that_left_late_keep_any_second_within_the_limit(fake: FakeTime) -> None:
    # 10 a second at most in any second, paced at 9.8/s; with several in flight, the ninth left
    # 150 ms after its turn (its event loop was busy) while the next were let go on time: the
    # second from when it left would hold 11 at the pace, so one of them waits
    limiter = LocalLimiter(concurrency=4, requests_per_minute=600, clock=fake, sleep=fake.sleep)

    async def main() -> list[float]:
        left, late = [], 0.0
        for i in range(20):
            turn = await limiter.pace(0)
            if i == 8:
                late_turn, late = turn, fake.now + 0.15
                continue
            if late and fake.now >= late - 0.1:
                late_turn.sent(late)  # told when it left, on the limiter's clock
                left.append(late)
                late = 0.0
            turn.sent()
            left.append(fake.now)
        return sorted(left)

    left = run(main())
    most = max(sum(t <= when < t + 1.0 for when in left) for t in left)
    assert most <= 10, [round(t, 3) for t in left]
