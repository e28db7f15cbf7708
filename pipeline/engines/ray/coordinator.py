"""The Ray engine's coordinator: one actor, pinned to the driver's node, holds the limiters of
every endpoint and the budget. Each request start is one call to it, so a 429's cool-down
pauses every actor on the cluster, and the run's RPM, TPM and budget are global, not per
actor; each HTTP actor keeps its share of the concurrency itself (`RemoteLimits`,
`RemotePurse`: the coordinator as the sending code sees it).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, defaultdict
from contextlib import AbstractAsyncContextManager
from typing import Any

import ray

from ...config import LimitsConfig
from ...cost.budget import Budget
from ...errors import Halted
from ...limits import OVERLAP_S, WINDOW_S, LocalLimits, Sent, Slots, Turn, roomiest

__all__ = ["Coordinator", "CoordinatorActor", "LEAD_S", "Owner", "RemoteLimiter", "RemoteLimits", "RemotePurse"]

# How far ahead of its moment a start is granted: longer than a reply from the coordinator takes
# to reach an actor, so requests leave as evenly as they were paced.
LEAD_S = 0.05
# A request that leaves later than its moment by more than this (its actor was busy) tells the
# coordinator, whose window then counts it from when it left; earlier lateness is in OVERLAP_S.
LATE_S = OVERLAP_S / 2
Owner = tuple[str, str]  # an HTTP actor's id, and which life of it (Ray restarts actors under the same id)


class Coordinator:
    """The run's limiters and budget, for the whole cluster (an async actor: one event loop).

    Budget holds are booked to the actor's life that took them. When Ray starts an actor again
    (its node was lost), the holds of its earlier life count as spent at their worst, since
    those requests may have been paid, and a hold that life still had waiting is refused when
    it comes through; otherwise they would hold the budget, and near the cap the run, forever.
    `end_wave` does the same for every life once a wave's actors are gone."""

    def __init__(self, limits: list[LimitsConfig], limit_usd: float | None, spent_usd: float) -> None:
        # paced LEAD_S ahead of the wall clock: a start is granted that much early, with the
        # moment to send, so the actor sends on time however long the reply took to reach it
        self.limits = LocalLimits.from_config(limits, self.clock)
        self.budget = Budget(limit_usd, spent_usd)
        self.lives: dict[str, str] = {}  # actor id -> its current life
        self.holds: dict[Owner, Counter[float]] = defaultdict(Counter)
        self.stopping = asyncio.Event()
        self.tickets = itertools.count()
        self.turns: dict[int, tuple[float, Sent]] = {}  # ticket -> when granted, what restamps its window

    @staticmethod
    def clock() -> float:
        return time.time() + LEAD_S

    async def waits(self, tokens: int) -> list[float]:
        return self.limits.waits(tokens)

    async def pace(self, endpoint: int, tokens: int) -> tuple[int, float, int] | None:
        """Wait for a request's turn; the cut of the pace it was given under, when to send it
        (wall clock) and its ticket for `sent`; None when the run is stopping (also while it
        waited) and the request must not be sent."""
        turn = asyncio.ensure_future(self.limits[endpoint].pace(tokens))
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait([turn, stop], return_when=asyncio.FIRST_COMPLETED)
        for waiting in (turn, stop):
            waiting.cancel()
        if self.stopping.is_set() or not turn.done() or turn.cancelled():
            return None
        granted = self.clock()
        ticket = next(self.tickets)
        self.turns[ticket] = (granted, turn.result().sent)
        while next(iter(self.turns.values()))[0] < granted - 2 * WINDOW_S:
            del self.turns[next(iter(self.turns))]  # its window has forgotten it
        return turn.result().epoch, granted, ticket

    async def sent(self, ticket: int, at: float) -> None:
        """The request of `ticket` left late, at `at` (wall clock): windows count it from then."""
        if (turn := self.turns.pop(ticket, None)) is not None:
            turn[1](at)

    async def answered(self, endpoint: int, reserved: int, counted: int) -> None:
        self.limits[endpoint].answered(reserved, counted)

    async def refused(self, endpoint: int, retry_after_s: float | None, epoch: int) -> None:
        self.limits[endpoint].refused(retry_after_s, epoch)

    async def held(self) -> list[str]:
        """What each endpoint's pace is held at below its limit, where it is."""
        return [str(held) for limiter in self.limits.limiters if (held := limiter.held())]

    async def lower(self, endpoint: int, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        self.limits[endpoint].lower(requests_per_minute, tokens_per_minute)

    async def begin(self, owner: Owner) -> None:
        """An HTTP actor starts a life: what an earlier one of it held counts as spent."""
        actor, life = owner
        if (earlier := self.lives.get(actor)) is not None:
            self._spend_holds((actor, earlier))
        self.lives[actor] = life

    async def hold(self, owner: Owner, worst_usd: float) -> bool:
        if self.stopping.is_set() or not await self.budget.hold(worst_usd):
            return False
        if self.lives.get(owner[0]) != owner[1]:  # a life that ended while this waited: nothing is sent
            self.budget.release(worst_usd, 0.0)
            return False
        self.holds[owner][worst_usd] += 1
        return True

    async def release(self, owner: Owner, worst_usd: float, actual_usd: float) -> None:
        held = self.holds[owner]
        held[worst_usd] -= 1
        if held[worst_usd] <= 0:
            del held[worst_usd]
        if not held:
            del self.holds[owner]
        self.budget.release(worst_usd, actual_usd)

    async def end_wave(self) -> None:
        """Every actor of a wave is gone: any hold still booked was a lost request's."""
        for owner in list(self.holds):
            self._spend_holds(owner)
        self.lives.clear()

    def _spend_holds(self, owner: Owner) -> None:
        for worst_usd, count in self.holds.pop(owner, Counter()).items():
            for _ in range(count):
                self.budget.release(worst_usd, worst_usd)

    async def stop(self) -> None:
        """No request starts from now on, on any actor, not even one waiting its turn."""
        self.stopping.set()

    async def is_stopping(self) -> bool:
        return self.stopping.is_set()

    async def spending(self) -> tuple[float, bool]:
        return self.budget.spent_usd, self.budget.exhausted


CoordinatorActor: Any = ray.remote(Coordinator)


class RemoteLimiter:
    """One endpoint's limits on the coordinator; this actor's share of its concurrency here.
    Each request start is one call to the coordinator, and each answer one more (not waited
    for): the pace learns from answers and 429s alike. A request that leaves late (this actor
    was busy) says so too, so the cluster's window counts it from when it really left."""

    def __init__(self, coordinator: Any, endpoint: int, slots: int) -> None:
        self._coordinator = coordinator
        self._endpoint = endpoint
        self.slots = Slots(slots)
        self._stated: tuple[int | None, int | None] = (None, None)

    def slot(self) -> AbstractAsyncContextManager[None]:
        return self.slots.taken()

    async def pace(self, tokens: int) -> Turn:
        """The coordinator's window counts the moment it names, when this actor sends."""
        turn: tuple[int, float, int] | None = await self._coordinator.pace.remote(self._endpoint, tokens)
        if turn is None:
            raise Halted("the run is stopping")
        epoch, send_at, ticket = turn
        await asyncio.sleep(max(0.0, send_at - time.time()))

        def sent(at: float | None = None) -> None:
            if (left := time.time() if at is None else at) > send_at + LATE_S:
                self._coordinator.sent.remote(ticket, left)

        return Turn(epoch, sent)

    def answered(self, reserved: int, counted: int) -> None:
        self._coordinator.answered.remote(self._endpoint, reserved, counted)

    def refused(self, retry_after_s: float | None, epoch: int) -> None:
        self._coordinator.refused.remote(self._endpoint, retry_after_s, epoch)

    def lower(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        """Passed on to the coordinator when they change, not with every answer."""
        if (requests_per_minute, tokens_per_minute) != self._stated:
            self._stated = (requests_per_minute, tokens_per_minute)
            self._coordinator.lower.remote(self._endpoint, requests_per_minute, tokens_per_minute)


class RemoteLimits:
    def __init__(self, coordinator: Any, limiters: list[RemoteLimiter]) -> None:
        self._coordinator = coordinator
        self._limiters = limiters

    def __getitem__(self, endpoint: int) -> RemoteLimiter:
        return self._limiters[endpoint]

    async def pick(self, tokens: int) -> int:
        """The endpoint whose cluster-wide buckets allow a request soonest; of those, the one
        with most free slots in this actor."""
        if len(self._limiters) == 1:
            return 0
        waits = await self._coordinator.waits.remote(tokens)
        return roomiest(waits, [limiter.slots.free for limiter in self._limiters])


class RemotePurse:
    """The budget on the coordinator, held in the name of this actor."""

    def __init__(self, coordinator: Any, owner: Owner) -> None:
        self._coordinator = coordinator
        self._owner = owner

    async def hold(self, worst_usd: float) -> bool:
        return bool(await self._coordinator.hold.remote(self._owner, worst_usd))

    def release(self, worst_usd: float, actual_usd: float) -> None:
        self._coordinator.release.remote(self._owner, worst_usd, actual_usd)
