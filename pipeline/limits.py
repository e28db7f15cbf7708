"""How many requests may be in flight and when the next may start.

Owns: the concurrency bound, requests-per-minute and tokens-per-minute pacing, the shared
cool-down after a 429, and which endpoint has most room for the next request. Never: HTTP, or
what a request contains.

The senders see two small interfaces, `Limiter` (one endpoint) and `Limits` (every endpoint of
a run), so the same sending code runs against the in-process buckets here or against the
cluster-wide ones the Ray engine serves from a single actor (`pipeline.ray_engine`).

The buckets are written here rather than taken from aiolimiter: a token reservation must be
settled against the usage the response reports afterwards, and a 429 must pause every
sender, and aiolimiter's leaky bucket has no public way to do either.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from .config import LimitsConfig

__all__ = ["Bucket", "Limiter", "Limits", "LocalLimiter", "LocalLimits", "Slots", "roomiest"]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]  # injectable, so tests run on a fake clock
# Providers enforce a per-minute limit over short windows, so a bucket holds at most this
# many seconds of allowance: requests start evenly, never as a burst of a whole minute.
BURST_S = 0.1


class Bucket:
    """A token bucket refilled continuously at `per_s`, holding at most `capacity`.

    The level may go below zero when a settled request cost more than was reserved;
    later takers then wait until the debt is refilled."""

    def __init__(self, per_s: float, capacity: float, clock: Clock = time.monotonic,
                 sleep: Sleep = asyncio.sleep) -> None:
        self.per_s = per_s
        self.capacity = capacity
        self._clock = clock
        self._sleep = sleep
        self._level = capacity
        self._stamp = clock()
        self._turn = asyncio.Lock()  # one waiter at a time, first come first served
        self._queued = 0.0  # what the takers waiting for their turn will take

    def _refill(self) -> float:
        now = self._clock()
        if now > self._stamp:  # nothing accrues before a pause ends
            self._level = min(self.capacity, self._level + (now - self._stamp) * self.per_s)
            self._stamp = now
        return self._level

    def pause(self, until: float) -> None:
        """Nothing may be taken before `until`, and the allowance starts from empty then, so
        the takers that waited out a pause leave at the bucket's rate, not as one burst."""
        self._refill()
        self._level = min(self._level, 0.0)
        self._stamp = max(self._stamp, until)

    def wait_s(self, amount: float) -> float:
        """Seconds until a newcomer could take `amount`, behind the takers already waiting (0
        when it could take it now)."""
        return self._wait(amount, ahead=self._queued)

    def _wait(self, amount: float, ahead: float = 0.0) -> float:
        """Seconds until `amount` could be taken after `ahead`; a pause counts whole, even when
        a settle gave allowance back meanwhile."""
        short = ahead + min(amount, self.capacity) - self._refill()
        paused = max(0.0, self._stamp - self._clock())
        return paused + (short / self.per_s if short > 1e-9 else 0.0)  # a float's last bit is not worth a wait

    async def take(self, amount: float) -> None:
        self._queued += amount
        try:
            async with self._turn:
                while (wait := self._wait(amount)) > 0:  # at the front: its own amount only
                    await self._sleep(wait)
                # a request larger than the bucket waits for a full one and leaves a debt behind,
                # so the average rate still holds
                self._level -= amount
        finally:
            self._queued -= amount

    def slow_to(self, per_s: float) -> None:
        """Refill at `per_s` from now on, holding at most BURST_S of it."""
        self._refill()
        self.per_s = per_s
        self.capacity = max(1.0, per_s * BURST_S)
        self._level = min(self._level, self.capacity)

    def settle(self, reserved: float, actual: float) -> None:
        """Give back what was over-reserved, or charge what was under-reserved."""
        self._refill()
        self._level = min(self.capacity, self._level + reserved - actual)


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

    async def pace(self, tokens: int) -> None: ...

    def settle(self, reserved: int, actual: int) -> None: ...

    def cool_down(self, seconds: float) -> None: ...

    def lower(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None: ...


class Limits(Protocol):
    """Every endpoint's limiter, and which endpoint the next request should go to."""

    def __getitem__(self, endpoint: int) -> Limiter: ...

    async def pick(self, tokens: int) -> int: ...


class LocalLimiter:
    """Concurrency, request and token pacing, and a cool-down shared by all senders in this
    process.

    Usage:
        limiter = LocalLimiter.from_config(cfg.limits)
        async with limiter.slot():             # one request in flight, retries included
            await limiter.pace(tokens)         # before each attempt
            ...
            limiter.settle(tokens, usage.total_tokens)
        limiter.cool_down(retry_after_s)       # after a 429: every sender waits
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
        self._requests = self._bucket(requests_per_minute, clock, sleep)
        self._tokens = self._bucket(tokens_per_minute, clock, sleep)
        self._resume_at = 0.0

    @staticmethod
    def _bucket(per_minute: int | None, clock: Clock, sleep: Sleep) -> Bucket | None:
        if per_minute is None:
            return None
        per_s = per_minute / 60
        return Bucket(per_s, max(1.0, per_s * BURST_S), clock, sleep)

    @classmethod
    def from_config(cls, limits: LimitsConfig) -> LocalLimiter:
        return cls(limits.concurrency, limits.requests_per_minute, limits.tokens_per_minute)

    def slot(self) -> AbstractAsyncContextManager[None]:
        return self.slots.taken()

    def wait_s(self, tokens: int) -> float:
        """Seconds until a request of `tokens` could start, were a slot free."""
        waits = [self._resume_at - self._clock()]
        if self._requests:
            waits.append(self._requests.wait_s(1))
        if self._tokens:
            waits.append(self._tokens.wait_s(tokens))
        return max(0.0, *waits)

    async def pace(self, tokens: int) -> None:
        """Wait until a request of `tokens` may start, and reserve it."""
        while (pause := self._resume_at - self._clock()) > 0:
            await self._sleep(pause)
        if self._requests:
            await self._requests.take(1)
        if self._tokens:
            await self._tokens.take(tokens)

    def settle(self, reserved: int, actual: int) -> None:
        if self._tokens:
            self._tokens.settle(reserved, actual)

    def lower(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        """Take the provider's stated limits (its x-ratelimit-limit-* headers) where they are
        lower than ours, or where we had none: a header can only ever lower a limit."""
        self._requests = self._lowered(self._requests, requests_per_minute)
        self._tokens = self._lowered(self._tokens, tokens_per_minute)

    def _lowered(self, bucket: Bucket | None, per_minute: int | None) -> Bucket | None:
        if per_minute is None:
            return bucket
        if bucket is None:
            return self._bucket(per_minute, self._clock, self._sleep)
        if per_minute / 60 < bucket.per_s:
            bucket.slow_to(per_minute / 60)
        return bucket

    def cool_down(self, seconds: float) -> None:
        """No request starts for `seconds` from now (a later, longer cool-down wins), not even
        one already waiting its turn in a bucket."""
        self._resume_at = max(self._resume_at, self._clock() + seconds)
        for bucket in (self._requests, self._tokens):
            if bucket:
                bucket.pause(self._resume_at)


def roomiest(waits: Sequence[float], free: Sequence[int]) -> int:
    """The endpoint a request could start on soonest (`waits`: seconds until each one's buckets
    allow it); of those, the one with most free slots, then the first."""
    return min(range(len(waits)), key=lambda i: (waits[i], -free[i], i))


class LocalLimits:
    """The limiters of a run's endpoints, in this process."""

    def __init__(self, limiters: Sequence[LocalLimiter]) -> None:
        self.limiters = list(limiters)

    @classmethod
    def from_config(cls, endpoints: Sequence[LimitsConfig]) -> LocalLimits:
        return cls([LocalLimiter.from_config(limits) for limits in endpoints])

    def __getitem__(self, endpoint: int) -> LocalLimiter:
        return self.limiters[endpoint]

    def waits(self, tokens: int) -> list[float]:
        return [limiter.wait_s(tokens) for limiter in self.limiters]

    async def pick(self, tokens: int) -> int:
        if len(self.limiters) == 1:
            return 0
        return roomiest(self.waits(tokens), [limiter.slots.free for limiter in self.limiters])
