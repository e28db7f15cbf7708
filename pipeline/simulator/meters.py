"""Rate limits as providers enforce them, for the simulator to hold clients to.

Owns: counting requests or tokens against a per-minute limit the ways providers document it
(PROVIDER_FACTS.md 3.3): over sliding windows of a second or ten (OpenAI, Azure), in counts
reset at each whole minute (LiteLLM's proxy and many gateways), or in a bucket refilled
continuously (Anthropic); another client of the same key using part of the limit; and the
x-ratelimit-* headers a provider sends. Never: HTTP, faults, or what a request contains.

Each meter is told the time (`now`, wall-clock seconds) so tests can drive it directly.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol

__all__ = ["Meter", "Bucket", "FixedWindow", "SlidingWindow", "go_duration", "meter", "seconds"]


def seconds(value: float) -> str:
    """Fractional seconds, rounded up to the millisecond so a client never comes back early."""
    return f"{math.ceil(value * 1000) / 1000:.3f}".rstrip("0").rstrip(".")


def go_duration(value: float) -> str:
    """A duration as OpenAI's x-ratelimit-reset-* headers write it: 300ms, 1.5s, 6m0s."""
    if value < 1:
        return f"{math.ceil(value * 1000)}ms"
    minutes, secs = divmod(value, 60)
    text = seconds(secs) + "s"
    if minutes >= 60:
        return f"{int(minutes) // 60}h{int(minutes) % 60}m{text}"
    return f"{int(minutes)}m{text}" if minutes else text


class Meter(Protocol):
    limit: int  # per minute, as the headers state it

    def wait_s(self, cost: float, now: float) -> float:
        """Seconds until `cost` fits (0: it fits now)."""
        ...

    def take(self, cost: float, now: float) -> None: ...

    def remaining(self, now: float) -> float:
        """What is left, in per-minute terms."""
        ...

    def reset_s(self, now: float) -> float:
        """Seconds until the whole limit is free again."""
        ...


class SlidingWindow:
    """At most limit x window_s / 60 in any window of window_s seconds, less what a neighbour on
    the same key uses (spread evenly)."""

    def __init__(self, limit: int, window_s: float, neighbour: int = 0) -> None:
        self.limit = limit
        self.window_s = window_s
        self.cap = (limit - neighbour) * window_s / 60
        self._log: deque[tuple[float, float]] = deque()
        self._used = 0.0

    def _expire(self, now: float) -> None:
        while self._log and self._log[0][0] <= now - self.window_s:
            self._used -= self._log.popleft()[1]

    def wait_s(self, cost: float, now: float) -> float:
        self._expire(now)
        if self._used + cost <= self.cap + 1e-9:
            return 0.0
        if cost > self.cap:
            return self.window_s  # larger than the whole window: it never fits
        freed, need = 0.0, self._used + cost - self.cap
        for when, amount in self._log:
            freed += amount
            if freed >= need - 1e-9:
                return when + self.window_s - now
        return self.window_s

    def take(self, cost: float, now: float) -> None:
        self._expire(now)
        self._log.append((now, cost))
        self._used += cost

    def remaining(self, now: float) -> float:
        self._expire(now)
        return max(0.0, self.cap - self._used) * 60 / self.window_s

    def reset_s(self, now: float) -> float:
        self._expire(now)
        return self._log[-1][0] + self.window_s - now if self._log else 0.0


class FixedWindow:
    """At most limit x window_s / 60 in each window of window_s seconds counted from the epoch
    (whole minutes for 60), less what a neighbour has used of it so far."""

    def __init__(self, limit: int, window_s: float, neighbour: int = 0) -> None:
        self.limit = limit
        self.window_s = window_s
        self.cap = limit * window_s / 60
        self._neighbour_per_s = neighbour / 60
        self._window = -1
        self._used = 0.0

    def _room(self, now: float) -> float:
        window = math.floor(now / self.window_s)
        if window != self._window:
            self._window, self._used = window, 0.0
        neighbour = self._neighbour_per_s * (now - window * self.window_s)
        return self.cap - neighbour - self._used

    def wait_s(self, cost: float, now: float) -> float:
        if cost <= self._room(now) + 1e-9:
            return 0.0
        return self.reset_s(now)

    def take(self, cost: float, now: float) -> None:
        self._room(now)
        self._used += cost

    def remaining(self, now: float) -> float:
        return max(0.0, self._room(now)) * 60 / self.window_s

    def reset_s(self, now: float) -> float:
        return (math.floor(now / self.window_s) + 1) * self.window_s - now


class Bucket:
    """Holds one second's allowance (at least one request), refilled continuously at what the
    neighbour leaves of limit / 60 a second."""

    def __init__(self, limit: int, neighbour: int = 0) -> None:
        self.limit = limit
        self.capacity = max(1.0, limit / 60)
        self._rate = max(limit - neighbour, 1) / 60
        self._level = self.capacity
        self._stamp: float | None = None

    def _refill(self, now: float, cost: float = 0.0) -> None:
        """Accrue up to the capacity, or up to `cost` for a request larger than it (it goes once
        the bucket holds all of it, and leaves a debt behind)."""
        if self._stamp is not None:
            self._level = min(max(self.capacity, cost), self._level + (now - self._stamp) * self._rate)
        self._stamp = now

    def wait_s(self, cost: float, now: float) -> float:
        self._refill(now, cost)
        return max(0.0, (cost - self._level) / self._rate)

    def take(self, cost: float, now: float) -> None:
        self._refill(now, cost)
        self._level -= cost

    def remaining(self, now: float) -> float:
        self._refill(now)
        return max(0.0, math.floor(self._level))

    def reset_s(self, now: float) -> float:
        self._refill(now)
        return max(0.0, self.capacity - self._level) / self._rate


def meter(mode: str, limit: int, window_s: float | None, neighbour: int) -> Meter:
    """The meter of one limit (requests or tokens a minute) under a simulator's settings."""
    if mode == "window":
        return SlidingWindow(limit, window_s or 1.0, neighbour)
    if mode == "fixed_minute":
        return FixedWindow(limit, window_s or 60.0, neighbour)
    return Bucket(limit, neighbour)
