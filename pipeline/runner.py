"""The asyncio loop that ties the stages together: rows in, one request each, results out.

Owns: the order of the stages, progress, the summary, stopping early when every request
fails alike. Only the runner drives the store and draws the progress bar.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import images, payload, results, simulator
from .client import ACCOUNT_STATUSES, Client, read_key
from .completion import Reply
from .config import EndpointConfig, RunConfig
from .errors import Interrupted, RequestFailed, RowInputError, RunStopped
from .limits import Limiter
from .manifest import Manifest, ManifestRow
from .pricing import PriceTable
from .store import Store

__all__ = ["Summary", "run"]

log = logging.getLogger(__name__)

PART_ROWS = 5_000  # a part is cut after this many rows ...
PART_SECONDS = 30.0  # ... or this many seconds, whichever comes first
# This many outcomes in a row with the same account-level status (401, 403, 404) stop the
# run: a wrong key or model name would otherwise fail every row of the manifest one by one.
ACCOUNT_STOP_AFTER = 3
_SIMULATOR_KEY = "simulator"
_Outcome = tuple[dict[str, Any], int | None]  # an output row, and the HTTP status it failed with


@dataclass
class Summary:
    output_dir: Path
    total: int = 0  # rows in the manifest
    resumed: int = 0  # already answered before this run
    ok: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    priced: bool = True  # False when some answered row had no known price
    elapsed_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    def count(self, row: dict[str, Any]) -> None:
        if row["status"] == "ok":
            self.ok += 1
            self.prompt_tokens += row["prompt_tokens"] or 0
            self.completion_tokens += row["completion_tokens"] or 0
            if row["cost_usd"] is None:
                self.priced = False
            else:
                self.cost_usd += row["cost_usd"]
        else:
            self.failed += 1
            kind = row["error"].split(":", 1)[0]
            self.errors[kind] = self.errors.get(kind, 0) + 1


@contextlib.contextmanager
def _endpoint(cfg: EndpointConfig) -> Iterator[tuple[EndpointConfig, str]]:
    """The endpoint to talk to and its key: the configured one, or the bundled simulator."""
    if cfg.simulator is None:
        yield cfg, read_key(cfg)
        return
    with simulator.running(cfg.simulator) as sim:
        yield cfg.model_copy(update={"base_url": sim.url}), read_key(cfg, fallback=_SIMULATOR_KEY)


class _Run:
    def __init__(self, cfg: RunConfig, manifest: Manifest, store: Store, client: Client, limiter: Limiter,
                 bar: tqdm[Any], summary: Summary) -> None:
        self.cfg = cfg
        self.manifest = manifest
        self.store = store
        self.client = client
        self.limiter = limiter
        self.bar = bar
        self.summary = summary
        self.prices = PriceTable(cfg.pricing)
        self.pending: list[dict[str, Any]] = []
        self.flushed_at = time.monotonic()
        self.stop_reason: str | None = None
        self._account_streak: tuple[int | None, int] = (None, 0)

    async def rows(self, limit: int | None) -> AsyncIterator[ManifestRow]:
        """Manifest rows not answered yet, each id once, read off the event loop."""
        batches = self.manifest.batches()
        seen: set[str] = set()
        sent = 0
        while batch := await asyncio.to_thread(next, batches, None):
            for row in batch:
                if row.id in self.store.done or row.id in seen:
                    continue
                if limit is not None and sent >= limit:
                    return
                seen.add(row.id)
                sent += 1
                yield row

    async def produce(self, queue: asyncio.Queue[ManifestRow | None], workers: int, limit: int | None) -> None:
        async for row in self.rows(limit):
            if self.stop_reason:
                break
            await queue.put(row)  # waits while the queue is full: memory stays flat
        for _ in range(workers):
            await queue.put(None)

    async def work(self, queue: asyncio.Queue[ManifestRow | None], out: asyncio.Queue[_Outcome | None]) -> None:
        while (row := await queue.get()) is not None:
            if not self.stop_reason:
                await out.put(await self.annotate(row))
        await out.put(None)

    async def annotate(self, row: ManifestRow) -> _Outcome:
        """One row's outcome and the HTTP status it failed with, if any. Row-level failures
        become error rows here and nowhere else."""
        prompt, request = self.cfg.prompt, self.cfg.request
        try:
            parts = await asyncio.to_thread(images.to_parts, row.images, self.manifest.root, prompt.max_side)
        except RowInputError as exc:
            return results.failed(row, f"image: {exc}", attempts=0), None
        body = payload.build(row, parts, request, prompt)
        reserved = payload.reserve_tokens(row, parts, request, prompt)
        async with self.limiter.slot():
            try:
                reply = await self.client.complete(body, reserved)
            except RequestFailed as exc:
                return results.failed(row, f"request: {exc}", attempts=exc.attempts), exc.status
        if reply.usage:
            output_reserved = (request.max_tokens or payload.UNSET_MAX_TOKENS) * request.choices
            self.limiter.settle(reserved, reply.usage.prompt_tokens + output_reserved)
        return results.answered(row, reply, self._cost(reply)), None

    def _cost(self, reply: Reply) -> float | None:
        if reply.usage is None:
            return None
        model = reply.model if reply.model and self.prices.find(reply.model) else self.cfg.request.model
        return self.prices.cost_usd(model, reply.usage)

    async def collect(self, out: asyncio.Queue[_Outcome | None], workers: int) -> None:
        finished = 0
        while finished < workers:
            outcome = await out.get()
            if outcome is None:
                finished += 1
                continue
            row, status = outcome
            self._watch_account(status, row)
            self.pending.append(row)
            self.summary.count(row)
            self.bar.update(1)
            self.bar.set_postfix(self._postfix(), refresh=False)
            if len(self.pending) >= PART_ROWS or time.monotonic() - self.flushed_at >= PART_SECONDS:
                await asyncio.to_thread(self.flush)

    def _watch_account(self, status: int | None, row: dict[str, Any]) -> None:
        last, streak = self._account_streak
        streak = streak + 1 if status in ACCOUNT_STATUSES and status == last else int(status in ACCOUNT_STATUSES)
        self._account_streak = (status, streak)
        if streak >= ACCOUNT_STOP_AFTER and not self.stop_reason:
            self.stop_reason = (f"{streak} requests in a row failed alike ({row['error']}); check the key in "
                                f"${self.cfg.endpoint.api_key_env}, the account and request.model")

    def _postfix(self) -> dict[str, Any]:
        s = self.summary
        tokens = s.prompt_tokens + s.completion_tokens
        return {"errors": s.failed, "tokens": tokens, **({"cost": f"${s.cost_usd:.4f}"} if s.priced else {})}

    def flush(self) -> None:
        if self.pending:
            self.store.write(self.pending)
            self.pending = []
        self.flushed_at = time.monotonic()


def _run_info(cfg: RunConfig, total: int) -> dict[str, Any]:
    config = cfg.model_dump(mode="json")
    config["endpoint"]["headers"] = sorted(cfg.endpoint.headers)  # names only: values may be private
    return {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": total, "config": config}


@contextlib.contextmanager
def _signals_cancel(task: asyncio.Task[Any]) -> Iterator[None]:
    """SIGINT and SIGTERM cancel the run, so its cleanup writes what was received."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def run(cfg: RunConfig, *, limit: int | None = None, progress: bool = True) -> Summary:
    """Run, or resume, one job. Raises ConfigError, ManifestError or StoreError before sending
    anything, RunStopped when every request fails alike, Interrupted on SIGINT or SIGTERM."""
    started = time.monotonic()
    manifest = Manifest(cfg.input, cfg.prompt)
    total = manifest.count()
    with _endpoint(cfg.endpoint) as (endpoint, key):
        store = Store(cfg.output.dir, results.schema(manifest.keep_schema))
        store.write_run_info(_run_info(cfg, total))
        summary = Summary(output_dir=cfg.output.dir, total=total, resumed=len(store.done))
        if PriceTable(cfg.pricing).find(cfg.request.model) is None:
            log.warning("no price known for %s: cost_usd stays empty (add it under pricing:)", cfg.request.model)
        limiter = Limiter.from_config(cfg.limits)
        client = Client(endpoint, key, limiter, concurrency=cfg.limits.concurrency,
                        max_attempts=cfg.limits.max_attempts)
        todo = total if limit is None else min(total, summary.resumed + limit)
        with tqdm(total=todo, initial=summary.resumed, unit="row", disable=not progress, dynamic_ncols=True) as bar:
            state = _Run(cfg, manifest, store, client, limiter, bar, summary)
            try:
                with _signals_cancel(asyncio.current_task()):  # type: ignore[arg-type]
                    await _pump(state, cfg.limits.concurrency, limit)
            except asyncio.CancelledError:
                raise Interrupted(f"interrupted; {summary.ok + summary.failed} rows answered now are in "
                                  f"{cfg.output.dir}; run the same command again to resume") from None
            finally:
                state.flush()
                store.close()
                await client.aclose()
    summary.elapsed_s = time.monotonic() - started
    if state.stop_reason:
        raise RunStopped(state.stop_reason)
    return summary


async def _pump(state: _Run, concurrency: int, limit: int | None) -> None:
    # More workers than request slots, so the next rows' images are ready when a slot frees.
    workers = concurrency + max(2, concurrency // 4)
    queue: asyncio.Queue[ManifestRow | None] = asyncio.Queue(maxsize=2 * workers)
    out: asyncio.Queue[_Outcome | None] = asyncio.Queue(maxsize=2 * workers)
    tasks = [asyncio.create_task(state.produce(queue, workers, limit)),
             *(asyncio.create_task(state.work(queue, out)) for _ in range(workers)),
             asyncio.create_task(state.collect(out, workers))]
    try:
        await asyncio.gather(*tasks)  # the first failure ends the run
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
