"""The spending cap of an output directory: what was spent, what requests in flight could
still cost, and whether one more may start.

Owns: the arithmetic of `limits.max_cost_usd`. Never: prices (the runner hands it dollars)
or I/O. Every request holds its worst-case cost from before it is sent until its answer
says what it really cost, so what the provider bills never passes the cap.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

__all__ = ["Budget", "Purse"]


class Purse(Protocol):
    """The budget as a sender sees it: in this process, or the cluster's (pipeline.engines.ray.coordinator)."""

    async def hold(self, worst_usd: float) -> bool: ...

    def release(self, worst_usd: float, actual_usd: float) -> None: ...


class Budget:
    def __init__(self, limit_usd: float | None, spent_usd: float = 0.0) -> None:
        self.limit_usd = limit_usd
        self.spent_usd = spent_usd  # earlier runs of the directory included
        self.held_usd = 0.0  # worst cases of the requests in flight
        self.in_flight = 0  # counted apart: float sums never come back to exactly zero
        self.exhausted = False
        self._settled = asyncio.Event()

    def hold_now(self, worst_usd: float) -> bool:
        """Hold a request's worst case, or say False when it could pass the cap. While other
        requests are in flight their real cost may leave room, so only a request that cannot
        fit with nothing in flight exhausts the budget."""
        if self.limit_usd is not None and self.spent_usd + self.held_usd + worst_usd > self.limit_usd:
            self.exhausted = self.in_flight == 0
            return False
        self.held_usd += worst_usd
        self.in_flight += 1
        return True

    def hold_committed(self, worst_usd: float) -> None:
        """Hold what is committed already (a batch the provider has, found by a run after a
        kill): it counts whether or not it fits."""
        self.held_usd += worst_usd
        self.in_flight += 1

    def spent(self) -> None:
        """No more requests: nothing in flight could give back room for one more."""
        self.exhausted = self.in_flight == 0

    async def hold(self, worst_usd: float) -> bool:
        """Hold a request's worst case, waiting while requests in flight may still leave
        room; False when the budget is spent and the request must not be sent."""
        while not self.hold_now(worst_usd):
            if self.exhausted:
                return False
            await self._settled.wait()
        return True

    def release(self, worst_usd: float, actual_usd: float) -> None:
        """A held request ended, costing `actual_usd`: wake those waiting for room."""
        self.held_usd -= worst_usd
        self.in_flight -= 1
        self.spent_usd += actual_usd
        self._settled.set()
        self._settled = asyncio.Event()
