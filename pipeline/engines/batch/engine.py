"""The batch engine's run: shards planned, uploaded, created, waited for and collected, each
step in the ledger before the next, so the same command after any kill goes on from there.

Owns: the order of the steps, re-attaching to the shards a killed run left, the budget held by
shards under way, the wait between looks, the progress bar's words. Never: the HTTP calls
(`api`), a line's form (`shards`), what a result means (`results`), the store (the driver's).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import polars as pl

from ... import payload, rows
from ...cost.pricing import PriceTable
from ...errors import Rejected, RowInputError, RunStopped
from ...fetch import Fetcher
from ...manifest import ManifestRow
from ...sender import Outcome
from ...store.ledger import Ledger, Shard
from ...store.parts import part_stamp
from ...structured import OutputSchema
from ..driver import Driver
from .api import BatchApi
from .results import by_custom_id, errors_of, verdict
from .shards import ShardFile, line_of

__all__ = ["BatchRun", "ENDED", "FOLDER", "SHARD_KEY"]

log = logging.getLogger(__name__)

FOLDER = "_batches"  # the output directory's folder of batch files not yet collected
SHARD_KEY = "annotate_shard"  # the metadata key naming a batch's shard
ENDED = frozenset({"completed", "expired", "cancelled", "failed"})
PREPARE_AT_ONCE = max(2, os.cpu_count() or 2)  # rows whose images are read and encoded at once


class BatchRun:
    def __init__(self, driver: Driver, api: BatchApi, ledger: Ledger, schema: OutputSchema | None) -> None:
        self.driver = driver
        self.cfg = driver.cfg
        self.api = api
        self.ledger = ledger
        self.schema = schema
        self.prices = PriceTable(self.cfg.pricing)
        self.folder = self.cfg.output.dir / FOLDER
        self.folder.mkdir(exist_ok=True)
        self.counts: dict[str, tuple[int, int, int]] = {}  # batch id -> done, failed, total
        self.max_requests, self.max_bytes = self.cfg.batch.max_requests, self.cfg.batch.max_bytes  # lowered by refusals
        self.returned = False  # rows of a file the provider refused came back to do

    # --- the whole run ---------------------------------------------------------------------

    async def run(self, limit: int | None, wait: bool) -> None:
        for shard in self.ledger.open_shards():  # a run before this one left them under way
            if shard.state == "created":
                self.driver.budget.hold_now(shard.worst_usd)
        while not self._stopping():
            for shard in self.ledger.open_shards():
                if shard.state != "created" and not self._stopping():
                    await self._submit(shard)
            self.returned = False
            if not self.driver.stopped():  # a spent budget plans nothing more, but collects
                await self._plan(limit)
            if self.returned:
                continue  # a file came back (too large for the provider): its rows go in smaller ones now
            if not wait or not any(shard.state == "created" for shard in self.ledger.open_shards()):
                return
            await self._wait_for_one()

    def _stopping(self) -> bool:
        """A signal, or a stop: leave the batches to the provider now."""
        return self.driver.signalled or self.driver.stop_reason is not None

    async def _wait_for_one(self) -> None:
        """Look at the batches under way every batch.poll_s until one or more ended; collect those."""
        while not self._stopping():
            ended = [found for shard in self.ledger.open_shards() if (found := await self._ended(shard))]
            for shard, batch in ended:
                await self._collect(shard, batch)
            if ended:
                return
            await self._sleep(self.cfg.batch.poll_s)

    async def _sleep(self, seconds: float) -> None:
        """A wait a signal ends at once: the batches go on without us."""
        until = time.monotonic() + seconds
        while not self._stopping() and (left := until - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.2))

    # --- planning ---------------------------------------------------------------------------

    async def _plan(self, limit: int | None) -> None:
        """Put the rows to do (none already in a shard under way) in shards, submitting each as
        it fills, until they are all in one or the budget has no room for the next."""
        batches = self.driver.todo(limit)
        shard: ShardFile | None = None
        fetcher = Fetcher(self.cfg.input.fetch)
        room = True
        try:
            while room and not self.driver.stopped() and (batch := await asyncio.to_thread(next, batches, None)):
                todo = await self._still_to_ask(batch)
                for row, prepared in zip(todo, await self._prepare_all(todo, fetcher)):
                    if isinstance(prepared, RowInputError):
                        await self._record([(rows.image_failed(row, prepared), None)])
                        continue
                    line, worst = self._line(row, prepared)
                    if shard is not None and not shard.fits(line, worst):
                        await self._submit(self._planned(shard))
                        shard = None
                    shard = shard or self._new_shard()
                    if not shard.fits(line, worst):  # not even alone: no room in the budget now
                        room = self._no_room()
                        break
                    shard.add(row, line, worst)
            if shard is not None and shard.rows:
                await self._submit(self._planned(shard))
        finally:
            if shard is not None and not shard.rows:
                shard.close()
                shard.path.unlink(missing_ok=True)
            await fetcher.aclose()

    def _no_room(self) -> bool:
        """The budget has no room for one more row: spent, when no batch under way could still
        give some back; else planning waits for their answers. False, for `room`."""
        budget = self.driver.budget
        budget.exhausted = budget.in_flight == 0
        return False

    async def _still_to_ask(self, batch: list[ManifestRow]) -> list[ManifestRow]:
        """The rows to put in a batch now: not in one under way, not recorded by this run; those
        already in batch.resubmit + 1 batches without an answer are recorded as retryable
        errors instead."""
        asked = self.ledger.asked([row.id for row in batch])
        fresh = [row for row in batch if (a := asked.get(row.id)) is None or (a.shard is None and not a.done)]
        most = self.cfg.batch.resubmit + 1
        spent = [row for row in fresh if row.id in asked and asked[row.id].tries >= most]
        if spent:
            await self._record([(rows.failed(row, f"request: no answer in {asked[row.id].tries} batches",
                                             asked[row.id].tries, True), None) for row in spent])
        return [row for row in fresh if row.id not in asked or asked[row.id].tries < most]

    async def _record(self, outcomes: list[Outcome]) -> None:
        """Outcomes to the store (through the driver), then marked done in the ledger."""
        await asyncio.to_thread(self.driver.record, outcomes)
        self.ledger.finished([row["id"] for row, _ in outcomes])

    async def _prepare_all(self, todo: list[ManifestRow], fetcher: Fetcher) -> list[payload.Prepared | RowInputError]:
        """Each row's request as it would go online (remote images fetched and inlined)."""
        gate = asyncio.Semaphore(PREPARE_AT_ONCE)

        async def one(row: ManifestRow) -> payload.Prepared | RowInputError:
            async with gate:
                try:
                    fetched = await fetcher.fetch_all(row.images)
                    return await asyncio.to_thread(payload.prepare, row, self.driver.manifest.root, self.cfg.request,
                                                   self.cfg.prompt, self.schema, fetched)
                except RowInputError as exc:
                    return exc

        return await asyncio.gather(*(one(row) for row in todo))

    def _line(self, row: ManifestRow, prepared: payload.Prepared) -> tuple[bytes, float]:
        tokens = prepared.tokens
        worst = self.prices.list_usd(self.cfg.request.model, tokens.input_max, tokens.output_max, batch=True)
        return line_of(row.id, prepared.body), worst or 0.0

    def _new_shard(self) -> ShardFile:
        budget = self.driver.budget
        room = None if budget.limit_usd is None else budget.limit_usd - budget.spent_usd - budget.held_usd
        return ShardFile(self.folder / f"{part_stamp()}.jsonl", self.max_requests, self.max_bytes, room)

    def _planned(self, file: ShardFile) -> Shard:
        file.close()
        return self.ledger.plan(file.path.stem, [(row.id, row) for row in file.rows], file.worst_usd)

    # --- submitting -------------------------------------------------------------------------

    async def _submit(self, shard: Shard) -> None:
        """Upload a planned shard and create its batch, each step in the ledger; its worst case
        held against the budget from before the batch is created."""
        path = self.folder / f"{shard.name}.jsonl"
        file_id = shard.file_id
        if shard.state == "planned":
            try:
                file_id = await self.api.upload(path, f"annotate-{shard.name}.jsonl")
            except Rejected as exc:
                await self._refused(shard, path, exc)
                return
            self.ledger.uploaded(shard.name, file_id)
        assert file_id is not None
        if not self.driver.budget.hold_now(shard.worst_usd):
            log.warning("batch file %s waits: its worst case ($%.4f) would pass limits.max_cost_usd",
                        shard.name, shard.worst_usd)
            return
        batch = await self.api.create(file_id, {SHARD_KEY: shard.name}, shard.planned_at)
        self.ledger.created(shard.name, str(batch["id"]), batch.get("expires_at"), str(batch.get("status")))
        log.info("batch %s: %d rows of file %s", batch["id"], shard.lines, shard.name)

    async def _refused(self, shard: Shard, path: Path, exc: Rejected) -> None:
        """The provider would not take a file (too large, most often): its rows go back to do,
        in files half its size; a file of one row it will not take is that row's error."""
        if exc.status not in (400, 413):
            raise RunStopped(f"the provider refused batch file {shard.name}: {exc}")
        if shard.lines == 1:
            held = self.ledger.rows_of(shard.name)
            await self._record([(rows.failed(row, f"request: {exc}", tries, False), 400) for row, tries in held])
        else:
            log.warning("the provider refused batch file %s of %d rows (%s): its rows go in files half its size",
                        shard.name, shard.lines, exc)
            self.max_bytes = min(self.max_bytes, max(1, path.stat().st_size // 2))
            self.max_requests = min(self.max_requests, max(1, shard.lines // 2))
            self.returned = True
        self.ledger.collected(shard.name)
        path.unlink(missing_ok=True)

    # --- waiting and collecting -------------------------------------------------------------

    async def _ended(self, shard: Shard) -> tuple[Shard, dict[str, Any]] | None:
        if shard.state != "created" or shard.batch_id is None:
            return None
        batch = await self.api.get(shard.batch_id)
        counts = batch.get("request_counts") or {}
        self.counts[shard.batch_id] = (counts.get("completed", 0), counts.get("failed", 0), counts.get("total", 0))
        self.ledger.seen(shard.name, str(batch.get("status")))
        self._show()
        return (shard, batch) if batch.get("status") in ENDED else None

    def _show(self) -> None:
        done, failed, total = (sum(c[i] for c in self.counts.values()) for i in range(3))
        self.driver.bar.set_postfix_str(f"batches: {len(self.counts)}, lines answered {done} + failed {failed} "
                                        f"of {total}", refresh=True)

    async def _collect(self, shard: Shard, batch: dict[str, Any]) -> None:
        """Journal what an ended batch answered; rows it did not answer go back to do (while they
        have tries left); then its files are deleted, here and at the provider."""
        if batch.get("status") == "failed":
            log.warning("batch %s failed: %s", batch["id"], errors_of(batch))
            if shard.lines > 1:  # too many lines or tokens for the provider, most often: smaller files
                self.max_requests = min(self.max_requests, max(1, shard.lines // 2))
        files = [await self.api.content(fid) for fid in (batch.get("output_file_id"), batch.get("error_file_id")) if fid]
        lines = by_custom_id(files)
        held = self.ledger.rows_of(shard.name)
        recorded = await asyncio.to_thread(self._already_done, [row.id for row, _ in held])
        outcomes: list[Outcome] = []
        charged = 0.0
        for row, tries in held:
            if row.id in recorded:
                continue  # journalled by a collection killed before the ledger heard: in a part now
            found = verdict(row, lines.get(row.id), batch, tries, self.prices, self.cfg.request.model, self.schema)
            charged += found.charged_usd
            if found.outcome is not None:
                outcomes.append(_with_batch(found.outcome, str(batch["id"])))
            elif tries > self.cfg.batch.resubmit:
                outcomes.append((rows.failed(row, f"request: {found.why}; in {tries} batches", tries, True), None))
        await self._record(outcomes)
        self.driver.budget.release(shard.worst_usd, charged)
        self.ledger.collected(shard.name)
        for fid in (shard.file_id, batch.get("output_file_id"), batch.get("error_file_id")):
            if fid:
                await self.api.delete(str(fid))
        (self.folder / f"{shard.name}.jsonl").unlink(missing_ok=True)

    def _already_done(self, ids: list[str]) -> set[str]:
        return set(self.driver.store.done.filter(pl.col("id").is_in(ids)).collect()["id"].to_list())


def _with_batch(outcome: Outcome, batch_id: str) -> Outcome:
    row, kind = outcome
    return {**row, "batch_id": batch_id}, kind
