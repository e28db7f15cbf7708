"""How many requests may be in flight and when the next may start.

Owns: the concurrency bound, requests-per-minute and tokens-per-minute pacing, and the
shared cool-down after a 429. Never: HTTP, or what a request contains.

The buckets are written here rather than taken from aiolimiter: a token reservation must be
settled against the usage the response reports afterwards, and a 429 must pause every
sender, and aiolimiter's leaky bucket has no public way to do either.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from .config import LimitsConfig

__all__ = ["Bucket", "Limiter"]

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

    def _refill(self) -> float:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.per_s)
        self._stamp = now
        return self._level

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` could be taken (0 when it can be taken now)."""
        short = min(amount, self.capacity) - self._refill()
        return short / self.per_s if short > 1e-9 else 0.0  # a float's last bit is not worth a wait

    async def take(self, amount: float) -> None:
        async with self._turn:
            while (wait := self.wait_s(amount)) > 0:
                await self._sleep(wait)
            # a request larger than the bucket waits for a full one and leaves a debt behind,
            # so the average rate still holds
            self._level -= amount

    def settle(self, reserved: float, actual: float) -> None:
        """Give back what was over-reserved, or charge what was under-reserved."""
        self._refill()
        self._level = min(self.capacity, self._level + reserved - actual)


class Limiter:
    """Concurrency, request and token pacing, and a cool-down shared by all senders.

    Usage:
        limiter = Limiter.from_config(cfg.limits)
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
        self._slots = asyncio.Semaphore(concurrency)
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
    def from_config(cls, limits: LimitsConfig) -> Limiter:
        return cls(limits.concurrency, limits.requests_per_minute, limits.tokens_per_minute)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._slots:
            yield

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

    def cool_down(self, seconds: float) -> None:
        """No request starts for `seconds` from now (a later, longer cool-down wins)."""
        self._resume_at = max(self._resume_at, self._clock() + seconds)
