"""The local engine: one asyncio loop reads rows, prepares images in threads, sends requests
and hands their outcomes to the driver in group commits.

Owns: the queues between reading, preparing, sending and journalling. Never: the store itself
(the driver writes it), or another engine.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from .. import payload, rows
from ..config import EndpointConfig
from ..errors import RowInputError
from ..fetch import Fetcher
from ..images import is_remote
from ..limits import LocalLimits
from ..manifest import ManifestRow
from ..sender import Outcome, Sender
from ..structured import OutputSchema
from .driver import Driver, stopping_on_signals

__all__ = ["run"]

GROUP_ROWS = 512  # at most this many outcomes share one journal transaction
_Durable = tuple[dict[str, Any], int | str | None, "asyncio.Future[None]"]  # an Outcome, and what tells it is on disk


class _Local:
    """The local engine: one asyncio loop reads rows, prepares images in threads, sends requests
    and journals their outcomes in group commits."""

    def __init__(self, driver: Driver, sender: Sender, fetcher: Fetcher) -> None:
        self.driver = driver
        self.sender = sender
        self.fetcher = fetcher
        self.inlined = driver.cfg.input.remote == "inline"  # else remote images go as URLs

    async def produce(self, queue: asyncio.Queue[ManifestRow | None], workers: int, limit: int | None) -> None:
        batches = self.driver.todo(limit)
        while not self.driver.stopped() and (batch := await asyncio.to_thread(next, batches, None)):
            for row in batch:
                if self.driver.stopped():
                    break
                await queue.put(row)  # waits while the queue is full: memory stays flat
        for _ in range(workers):
            await queue.put(None)

    async def work(self, queue: asyncio.Queue[ManifestRow | None], out: asyncio.Queue[_Durable | None]) -> None:
        deliver = functools.partial(self._journal, out)
        while (row := await queue.get()) is not None:
            if self.driver.stopped():
                continue
            try:
                prepared = await self._prepare(row, inline=self.inlined)
            except RowInputError as exc:
                await deliver((rows.image_failed(row, exc), None))
                continue
            remote = not self.inlined and any(map(is_remote, row.images))
            await self.sender.annotate(row, prepared, deliver,
                                       functools.partial(self._prepare, row, inline=True) if remote else None)
        await out.put(None)

    async def _prepare(self, row: ManifestRow, inline: bool) -> payload.Prepared:
        """The row's request, its object-store images fetched first, and its http(s) ones when `inline`."""
        cfg = self.driver.cfg
        fetched = await self.fetcher.fetch_all(row.images, http=inline)
        return await asyncio.to_thread(payload.prepare, row, self.driver.manifest.root, cfg.request, cfg.prompt,
                                       self.sender.schema, fetched)

    @staticmethod
    async def _journal(out: asyncio.Queue[_Durable | None], outcome: Outcome) -> None:
        """Hand an outcome to the collector and wait until it is on disk."""
        durable: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await out.put((*outcome, durable))
        await durable

    async def collect(self, out: asyncio.Queue[_Durable | None], workers: int) -> None:
        """Journal outcomes as they come, many to a transaction (group commit), then count
        them as done and let their workers go on."""
        finished = 0
        while finished < workers:
            batch = [await out.get()]
            while len(batch) < GROUP_ROWS and not out.empty():
                batch.append(out.get_nowait())
            outcomes = [outcome for outcome in batch if outcome is not None]
            finished += len(batch) - len(outcomes)
            await asyncio.to_thread(self.driver.record, [(row, kind) for row, kind, _ in outcomes])
            for _, _, durable in outcomes:
                durable.set_result(None)

    async def pump(self, concurrency: int, limit: int | None) -> None:
        # More workers than request slots, so the next rows' images are ready when a slot frees.
        workers = concurrency + max(2, concurrency // 4)
        queue: asyncio.Queue[ManifestRow | None] = asyncio.Queue(maxsize=2 * workers)
        out: asyncio.Queue[_Durable | None] = asyncio.Queue(maxsize=2 * workers)
        tasks = [asyncio.create_task(self.produce(queue, workers, limit)),
                 *(asyncio.create_task(self.work(queue, out)) for _ in range(workers)),
                 asyncio.create_task(self.collect(out, workers))]
        try:
            with stopping_on_signals(self.driver):
                await asyncio.gather(*tasks)  # the first failure ends the run
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def run(driver: Driver, endpoints: list[EndpointConfig], schema: OutputSchema | None,
              limit: int | None) -> None:
    cfg = driver.cfg
    own = cfg.target_limits
    limits = LocalLimits.from_config(own)
    driver.held = lambda: "; ".join(str(held) for limiter in limits.limiters if (held := limiter.held()))
    slots = [lim.concurrency for lim in own]
    sender = Sender(cfg, endpoints, slots, limits, driver.budget, schema, driver.stopped)
    fetcher = Fetcher(cfg.input.fetch)  # opens its pool on the first remote image only
    try:
        await _Local(driver, sender, fetcher).pump(sum(slots), limit)
    finally:
        await sender.aclose()
        await fetcher.aclose()
