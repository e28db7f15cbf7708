"""How many requests may be in flight and when the next may start.

Owns: the concurrency bound, requests-per-minute and tokens-per-minute pacing, what a 429
changes (the pace found when the provider allows less than configured, and the pause it
asks for), and which endpoint has most room for the next request. Never: HTTP, or what a
request contains.

The senders see two small interfaces, `Limiter` (one endpoint) and `Limits` (every endpoint of
a run), so the same sending code runs against the in-process pacing here or against the
cluster-wide one the Ray engine serves from a single actor (`pipeline.engines.ray.coordinator`).

Providers enforce a per-minute limit over short windows (OpenAI over shorter periods such as a
second, Azure over 1 or 10 s, gateways per fixed minute), so pacing here allows no burst: a
request starts only once its own share of the rate has accrued since the one before, and no
window of any length ever holds more than the rate allows. Written here rather than taken from
aiolimiter: its leaky bucket allows a burst of a whole capacity, and has no public way to
settle a reservation against the usage reported afterwards or to slow to a rate found from 429s.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from .config import LimitsConfig

__all__ = ["Held", "Limiter", "Limits", "LocalLimiter", "LocalLimits", "Pace", "Sent", "Slots", "Turn", "roomiest"]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]  # injectable, so tests run on a fake clock

# A configured or stated limit is paced at this share of itself, and no window of WINDOW_S
# (the shortest providers enforce: OpenAI, Azure) holds more than WINDOW_SHARE of it: room
# for requests that reach the provider closer together than they left (20 and 5 ms a second).
# Requests, evenly spaced, fill no window past the limit while they leave on time; their window
# holds the known limit itself (not a pace cut below it) and binds only when some left late (a
# busy event loop or actor) and would reach the provider closer together than paced.
HEADROOM = 0.98
WINDOW_S = 1.0
WINDOW_SHARE = 0.995 / HEADROOM
REQUESTS_WINDOW_SHARE = 1 / HEADROOM
# A start is kept in the window this much longer than WINDOW_S: a later request may reach the
# provider sooner after leaving than an earlier one did, while the earlier is still counted there.
OVERLAP_S = 0.01
# How far a sender woken late may fall behind the schedule and still catch up: late wake-ups
# cost little, while a longer stall (a busy machine, a GC pause) is not made up in a burst.
# Evenly spaced requests keep 17 ms of a second's room for jitter so; tokens catch up further
# after a large request held for room.
CATCH_UP_S = 0.003
CATCH_UP_TOKENS_S = 0.02
# After a 429 while others are answered, the pace drops to this share of what was sent over
# the last WINDOW_S, and regrows by GROWTH_PER_S a second (compounded) from MEASURE_S after,
# up to the configured limit: it settles just under what the provider allows, and finds room
# again when another user of the key stops.
CUT = 0.9
GROWTH_PER_S = 0.02
MEASURE_S = 2.0
# When the provider refuses again with nothing answered since, it is closed for now (a fixed
# minute used up): everyone waits what it asks, or, when it names no wait, COOL_DOWN_S,
# doubled each time it refuses again, up to MAX_PAUSE_S.
COOL_DOWN_S = 1.0
MAX_PAUSE_S = 60.0


class Pace:
    """Requests (or tokens) started at `per_s` at most, with no burst: a taker starts once its
    own amount has accrued since the allowance was last spent, and once the last WINDOW_S
    of starts leave room for it.

    The first rule spreads starts evenly; the second keeps a large request from landing in a
    window that already holds a second's allowance, which the first alone allows when a window
    opens just before a large request (it would hold per_s + that request).
    `_spent_to` is the moment up to which the allowance is spent; it may lie in the future
    (takers are lined up) but never more than its catch-up in the past when a taker reaches the
    front."""

    def __init__(self, per_s: float, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep,
                 window_share: float = WINDOW_SHARE, catch_up_s: float = CATCH_UP_TOKENS_S,
                 window_at_ceiling: bool = False) -> None:
        self.per_s = per_s  # math.inf: no limit, only counting
        self.ceiling = per_s  # the known limit's pace: cuts go below it, regrowth stops at it
        self._window_at_ceiling = window_at_ceiling  # False: the window follows per_s, wherever it is
        self._window_share = window_share
        self._clock = clock
        self._sleep = sleep
        self._spent_to = -math.inf  # the schedule starts with the first taker
        self._catch_up = catch_up_s
        self._not_before = -math.inf  # the end of a pause: a settle cannot move a start before it
        self._turn = asyncio.Lock()  # one taker at a time, first come first served
        self._queued = 0.0  # what the takers waiting for their turn will take
        self._window: deque[list[float]] = deque()  # [when, amount] over the last WINDOW_S
        self._in_window = 0.0

    def _after(self, amount: float) -> float:
        return amount / self.per_s if self.per_s < math.inf else 0.0

    def _start(self) -> float:
        """From when the next taker's share accrues: a stall is not made up, a pause is kept."""
        now = self._clock()
        return max(self._spent_to, now - self._catch_up if self._spent_to > -math.inf else now, self._not_before)

    def wait_s(self, amount: float) -> float:
        """Seconds until a newcomer could take `amount`, behind the takers already waiting."""
        return max(0.0, self._start() + self._after(self._queued + amount) - self._clock())

    async def take(self, amount: float) -> list[float]:
        """Wait for `amount`'s turn and count it; its [when, amount] in the window, which
        `restamp` moves to when the request really left."""
        self._queued += amount
        try:
            async with self._turn:
                self._spent_to = self._start()
                # a pause, a new rate or a settle may move the moment while this taker waits
                while (wait := self._wait(amount)) > 1e-9:
                    await self._sleep(wait)
                self._spent_to = max(self._spent_to, self._not_before) + self._after(amount)
                return self._count(self._clock(), amount)
        finally:
            self._queued -= amount

    def restamp(self, entry: list[float], at: float | None = None) -> None:
        """The request of this entry left now (or `at`, on this pace's clock): it stays in the
        window until WINDOW_S after."""
        entry[0] = max(entry[0], self._clock() if at is None else at)

    def _wait(self, amount: float) -> float:
        now = self._clock()
        due = max(self._spent_to, self._not_before) + self._after(amount)
        return max(due - now, self._room_in(amount, now))

    def _room_in(self, amount: float, now: float) -> float:
        """Seconds until the last WINDOW_S of starts leave room for `amount` (a taker larger than
        the whole window waits for an empty one)."""
        self._expire(now)
        cap = (self.ceiling if self._window_at_ceiling else self.per_s) * WINDOW_S * self._window_share
        need = self._in_window + min(amount, cap) - cap
        wait = 0.0
        for when, taken in self._window:  # oldest first, but a restamped one may be later than the next
            if need <= 1e-9:
                break
            need -= taken
            wait = max(wait, when + WINDOW_S + OVERLAP_S - now)
        return wait

    def _expire(self, now: float) -> None:
        while self._window and self._window[0][0] <= now - WINDOW_S - OVERLAP_S:
            self._in_window -= self._window.popleft()[1]

    def _count(self, now: float, amount: float) -> list[float]:
        self._expire(now)
        entry = [now, amount]
        self._window.append(entry)
        self._in_window += amount
        return entry

    def sent_per_s(self) -> float:
        """What was taken a second over the last WINDOW_S: less than was sent a second when the
        run is younger than that, which errs on the side the provider wants."""
        self._expire(self._clock())
        return self._in_window / (WINDOW_S + OVERLAP_S)

    def lower_to(self, per_s: float) -> None:
        """A lower limit became known: neither the pace nor its window goes above it."""
        self.per_s = min(self.per_s, per_s)
        self.ceiling = min(self.ceiling, per_s)

    def pause(self, until: float) -> None:
        """Nothing may be taken before `until`, and the allowance starts from nothing then, so
        the takers that waited out a pause leave at the rate, not as one burst."""
        self._not_before = max(self._not_before, until)

    def settle(self, reserved: float, actual: float) -> None:
        """Charge what was under-reserved; give back what was over-reserved while takers are
        lined up (a give-back for a moment past is not made up, as a stall is not)."""
        self._spent_to += self._after(actual - reserved)
        if actual > reserved:
            self._count(self._clock(), actual - reserved)


class Sent(Protocol):
    """Called when a request really leaves (now, or `at` on the limiter's clock)."""

    def __call__(self, at: float | None = None) -> None: ...


def _unwatched(at: float | None = None) -> None:
    """A turn whose window does not follow when the request left."""


@dataclass(frozen=True)
class Turn:
    """A request's turn: the cut of the pace it was given under, and what to call the moment it
    really leaves (its body written), so a window counts it from then."""

    epoch: int
    sent: Sent = _unwatched


@dataclass(frozen=True)
class Held:
    """A limiter pacing below its configured limit: at what rate, and why."""

    per_minute: float
    configured: float | None  # per minute; None when none was configured
    kind: str  # "requests" or "tokens"
    refusals: int  # 429s so far

    def __str__(self) -> str:
        unit = "RPM" if self.kind == "requests" else "TPM"
        of = f" of {self.configured:,.0f}" if self.configured else ""
        return f"held at {self.per_minute:,.0f} {unit}{of}: the provider answered 429 ({self.refusals} so far)"


class Slots:
    """A concurrency bound that can say how many of its slots are free."""

    def __init__(self, count: int) -> None:
        self._semaphore = asyncio.Semaphore(count)
        self.free = count

    @asynccontextmanager
    async def taken(self) -> AsyncIterator[None]:
        async with self._semaphore:
            self.free -= 1
            try:
                yield
            finally:
                self.free += 1


class Limiter(Protocol):
    """One endpoint's limits, as a sender sees them."""

    def slot(self) -> AbstractAsyncContextManager[None]: ...

    async def pace(self, tokens: int) -> Turn: ...

    def answered(self, reserved: int, counted: int) -> None: ...

    def refused(self, retry_after_s: float | None, epoch: int) -> None: ...

    def lower(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None: ...


class Limits(Protocol):
    """Every endpoint's limiter, and which endpoint the next request should go to."""

    def __getitem__(self, endpoint: int) -> Limiter: ...

    async def pick(self, tokens: int) -> int: ...


class LocalLimiter:
    """Concurrency, request and token pacing, and what 429s teach, shared by all senders in
    this process.

    Usage:
        limiter = LocalLimiter.from_config(cfg.limits)
        async with limiter.slot():                 # one request in flight, retries included
            turn = await limiter.pace(tokens)      # before each attempt
            ...                                    # turn.sent() when its body is written
            limiter.answered(tokens, counted)      # after an answer
            limiter.refused(retry_after_s, turn.epoch)  # after a 429

    A 429 to a request paced since the last cut (`epoch` names the cut it was paced under),
    while others are answered, shows the provider allows less than the pace: the pace is cut.
    A 429 with nothing answered since the last one shows the provider closed for a while: every
    sender pauses for the wait it asks. A 429 to a request paced before the last cut or pause
    says nothing new: only that request waits (the client's retry obeys its Retry-After).
    """

    def __init__(
        self,
        concurrency: int,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.slots = Slots(concurrency)
        self._clock = clock
        self._sleep = sleep
        self._configured = {"requests": requests_per_minute, "tokens": tokens_per_minute}
        # requests are always counted (a 429 may show a limit where none was configured)
        self._paces: dict[str, Pace] = {"requests": self._pace("requests", requests_per_minute)}
        if tokens_per_minute is not None:
            self._paces["tokens"] = self._pace("tokens", tokens_per_minute)
        self._resume_at = 0.0
        self._epoch = 0
        self._cut_at = -math.inf
        self._closed = 0  # 429s since the last answer
        self._grown_at = clock()
        self.refusals = 0

    def _pace(self, kind: str, per_minute: int | None) -> Pace:
        """Requests of one each, evenly spaced, fill a window of w seconds with at most
        per_s * (w + CATCH_UP_S) of them, rounded up, which is within the limit."""
        per_s = math.inf if per_minute is None else per_minute / 60 * HEADROOM
        if kind == "requests":
            return Pace(per_s, self._clock, self._sleep, REQUESTS_WINDOW_SHARE, CATCH_UP_S, window_at_ceiling=True)
        return Pace(per_s, self._clock, self._sleep)

    @classmethod
    def from_config(cls, limits: LimitsConfig, clock: Clock = time.monotonic) -> LocalLimiter:
        return cls(limits.concurrency, limits.requests_per_minute, limits.tokens_per_minute, clock)

    def slot(self) -> AbstractAsyncContextManager[None]:
        return self.slots.taken()

    def _amounts(self, tokens: int) -> dict[str, float]:
        return {"requests": 1, "tokens": tokens}

    def wait_s(self, tokens: int) -> float:
        """Seconds until a request of `tokens` could start, were a slot free."""
        amounts = self._amounts(tokens)
        waits = [self._resume_at - self._clock(), *(p.wait_s(amounts[k]) for k, p in self._paces.items())]
        return max(0.0, *waits)

    async def pace(self, tokens: int) -> Turn:
        """Wait until a request of `tokens` may start, and count it."""
        while (pause := self._resume_at - self._clock()) > 0:
            await self._sleep(pause)
        self._grow()
        epoch = self._epoch
        amounts = self._amounts(tokens)
        entries = [(pace, await pace.take(amounts[kind])) for kind, pace in list(self._paces.items())]

        def sent(at: float | None = None) -> None:
            for pace, entry in entries:
                pace.restamp(entry, at)

        return Turn(epoch, sent)

    def answered(self, reserved: int, counted: int) -> None:
        """A request was answered: the provider lets requests through at this pace, and counted
        `counted` tokens where `reserved` were paced."""
        self._closed = 0
        if tokens := self._paces.get("tokens"):
            tokens.settle(reserved, counted)

    def lower(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        """Take the provider's stated limits (its x-ratelimit-limit-* headers) where they are
        lower than ours, or where we had none: a header can only ever lower a limit."""
        for kind, per_minute in (("requests", requests_per_minute), ("tokens", tokens_per_minute)):
            if per_minute is None:
                continue
            if kind in self._paces:
                self._paces[kind].lower_to(per_minute / 60 * HEADROOM)
            else:
                self._paces[kind] = self._pace(kind, per_minute)

    def refused(self, retry_after_s: float | None, epoch: int) -> None:
        """A 429 to a request paced under `epoch`, naming `retry_after_s` or no wait."""
        self.refusals += 1
        if epoch != self._epoch:
            return  # paced before the last cut or pause: already answered by it
        if self._closed:  # nothing answered since the last 429: the provider is closed for now
            asked = COOL_DOWN_S * 2 ** (self._closed - 1) if retry_after_s is None else retry_after_s
            self._pause(self._clock() + min(asked, MAX_PAUSE_S))
            self._epoch += 1
        else:  # others got through: the pace is above what the provider allows
            self._cut()
        self._closed += 1

    def _cut(self) -> None:
        for pace in self._paces.values():
            pace.per_s = max(CUT * min(pace.per_s, pace.sent_per_s()), 1 / 60)  # never below one a minute
        self._epoch += 1
        self._cut_at = self._grown_at = self._clock()

    def _grow(self) -> None:
        """Regrow the pace towards the ceilings, from MEASURE_S after the last cut."""
        now = self._clock()
        since = now - max(self._grown_at, self._cut_at + MEASURE_S)
        if since <= 0:
            return
        self._grown_at = now
        for pace in self._paces.values():
            if pace.per_s < pace.ceiling:
                pace.per_s = min(pace.ceiling, pace.per_s * math.exp(GROWTH_PER_S * since))

    def _pause(self, until: float) -> None:
        """No request starts before `until` (a later pause wins), not even one already waiting
        its turn."""
        self._resume_at = max(self._resume_at, until)
        for pace in self._paces.values():
            pace.pause(self._resume_at)

    def held(self) -> Held | None:
        """The pace kept below the configured limit after 429s, if it is."""
        for kind, pace in self._paces.items():
            configured = self._configured.get(kind)
            if pace.per_s < pace.ceiling * 0.999:
                return Held(pace.per_s * 60, configured if configured else None, kind, self.refusals)
        return None


def roomiest(waits: Sequence[float], free: Sequence[int]) -> int:
    """The endpoint a request could start on soonest: one with a free slot (a request waiting
    for a slot is not yet in its pace's line), then the soonest by `waits` (seconds until each
    one's pacing allows it), then the one with most free slots, then the first."""
    return min(range(len(waits)), key=lambda i: (free[i] == 0, waits[i], -free[i], i))


class LocalLimits:
    """The limiters of a run's endpoints, in this process."""

    def __init__(self, limiters: Sequence[LocalLimiter]) -> None:
        self.limiters = list(limiters)

    @classmethod
    def from_config(cls, endpoints: Sequence[LimitsConfig], clock: Clock = time.monotonic) -> LocalLimits:
        return cls([LocalLimiter.from_config(limits, clock) for limits in endpoints])

    def __getitem__(self, endpoint: int) -> LocalLimiter:
        return self.limiters[endpoint]

    def waits(self, tokens: int) -> list[float]:
        return [limiter.wait_s(tokens) for limiter in self.limiters]

    async def pick(self, tokens: int) -> int:
        if len(self.limiters) == 1:
            return 0
        return roomiest(self.waits(tokens), [limiter.slots.free for limiter in self.limiters])
