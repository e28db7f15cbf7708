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
from .results import Carry, Reading, by_custom_id, errors_of, verdict
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
        self.reading = Reading(self.prices, self.cfg.request.model, schema, self.cfg.request.parse_retries)
        self.folder = self.driver.store.local / FOLDER
        self.folder.mkdir(exist_ok=True)
        self.counts: dict[str, tuple[int, int, int]] = {}  # batch id -> done, failed, total
        self.max_requests, self.max_bytes = self.cfg.batch.max_requests, self.cfg.batch.max_bytes  # lowered by refusals

    # --- the whole run ---------------------------------------------------------------------

    async def run(self, limit: int | None, wait: bool) -> None:
        """Submit what a killed run left, plan and submit the rows to do, and (when `wait`)
        collect the batches as they end, planning again what they did not answer. `limit` 0:
        only collect the batches under way (what `annotate batch cancel` does)."""
        self._reattach()
        while not self._stopping():
            if limit != 0:
                again = await self._submit_left() | await self._plan(limit)
                if again:
                    continue  # a file came back (too large for the provider): its rows go in smaller ones now
            if await self._collect_ended() and limit != 0:
                continue  # plan again what they did not answer
            if not wait or not self._under_way():
                return
            await self._sleep(self.cfg.batch.poll_s)

    def _reattach(self) -> None:
        """What a run before this one left: a fresh try for rows in no batch, the budget held by
        batches the provider has, and no batch file that the ledger does not name."""
        self.ledger.new_run()
        named = set()
        for shard in self.ledger.open_shards():
            named.add(shard.name)
            if shard.state == "created":
                self.driver.budget.hold_committed(shard.worst_usd)
        for path in self.folder.glob("*.jsonl"):
            if path.stem not in named:  # written, but killed before the ledger heard of it
                path.unlink()

    def _stopping(self) -> bool:
        """A signal, or a stop: leave the batches to the provider now."""
        return self.driver.signalled or self.driver.stop_reason is not None

    def _under_way(self) -> bool:
        return any(shard.state == "created" for shard in self.ledger.open_shards())

    async def _sleep(self, seconds: float) -> None:
        """A wait a signal ends at once: the batches go on without us."""
        until = time.monotonic() + seconds
        while not self._stopping() and (left := until - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.2))

    # --- planning ---------------------------------------------------------------------------

    async def _plan(self, limit: int | None) -> bool:
        """Put the rows to do (none in a batch under way) in files, submitting each as it
        fills, until all are in one or the budget has no room for the next; True when a file
        came back to be split."""
        if self.driver.stopped():  # a spent budget plans nothing more, but collects
            return False
        batches = self.driver.todo(limit)
        shard: ShardFile | None = None
        fetcher = Fetcher(self.cfg.input.fetch)
        came_back, room = False, True
        try:
            while room and not came_back and not self.driver.stopped() and (
                    batch := await asyncio.to_thread(next, batches, None)):
                todo = await self._still_to_ask(batch)
                for (row, carry), prepared in zip(todo, await self._prepare_all([row for row, _ in todo], fetcher)):
                    if isinstance(prepared, RowInputError):
                        await self._record([(rows.image_failed(row, prepared), None)])
                        continue
                    line, worst = self._line(row, prepared, carry)
                    if shard is not None and not shard.fits(line, worst):
                        came_back = await self._submit(self._planned(shard))
                        shard = None
                    shard = shard or self._new_shard()
                    if shard.never_fits(line):
                        await self._record([(rows.failed(row, f"request: its batch line is {len(line)} bytes, more than "
                                                             f"a batch file may hold ({shard.max_bytes})", 0, False),
                                             None)])
                        continue
                    if not shard.fits(line, worst):  # not even alone: no room in the budget until answers come
                        self.driver.budget.spent()
                        room = False
                        break
                    shard.add(row, prepared.image_notes, line, worst)
            if shard is not None and shard.rows:
                came_back |= await self._submit(self._planned(shard))
        finally:
            if shard is not None and not shard.rows:
                shard.close()
                shard.path.unlink(missing_ok=True)
            await fetcher.aclose()
        return came_back

    async def _still_to_ask(self, batch: list[ManifestRow]) -> list[tuple[ManifestRow, Carry | None]]:
        """The rows to put in a batch now (each with what its earlier answers left it): not in
        one under way, not recorded by this run; those already in batch.resubmit + 1 batches
        without an answer are recorded as retryable errors instead."""
        asked = self.ledger.asked([row.id for row in batch])
        fresh = [row for row in batch if (a := asked.get(row.id)) is None or (a.shard is None and not a.done)]
        most = self.cfg.batch.resubmit + 1
        spent = [row for row in fresh if row.id in asked and asked[row.id].tries >= most]
        if spent:
            await self._record([(_no_answer(row, "no batch answered it", asked[row.id].tries), None) for row in spent])
        return [(row, asked[row.id].carry if row.id in asked else None) for row in fresh
                if row.id not in asked or asked[row.id].tries < most]

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

    def _line(self, row: ManifestRow, prepared: payload.Prepared, carry: Carry | None) -> tuple[bytes, float]:
        """The row's batch line (asking again, after what its earlier answers left it) and its worst case."""
        body, tokens = prepared.body, prepared.tokens
        if carry is not None:
            body, tokens = payload.follow_up(body, tokens, carry.messages, self.cfg.request.model)
        worst = self.prices.list_usd(self.cfg.request.model, tokens.input_max, tokens.output_max, batch=True)
        return line_of(row.id, body), worst or 0.0

    def _new_shard(self) -> ShardFile:
        budget = self.driver.budget
        room = None if budget.limit_usd is None else budget.limit_usd - budget.spent_usd - budget.held_usd
        return ShardFile(self.folder / f"{part_stamp()}.jsonl", self.max_requests, self.max_bytes, room)

    def _planned(self, file: ShardFile) -> Shard:
        file.close()
        return self.ledger.plan(file.path.stem, [(row.id, (row, notes)) for row, notes in file.rows], file.worst_usd)

    # --- submitting -------------------------------------------------------------------------

    async def _submit_left(self) -> bool:
        """Submit the files a run left planned or uploaded; True when one came back."""
        came_back = False
        for shard in self.ledger.open_shards():
            if shard.state != "created" and not self._stopping():
                came_back |= await self._submit(shard)
        return came_back

    async def _submit(self, shard: Shard) -> bool:
        """Upload a planned file and create its batch, each step in the ledger; its worst case
        held against the budget from before the batch is created. True when the provider
        refused the file and its rows came back to do."""
        path = self.folder / f"{shard.name}.jsonl"
        file_id = shard.file_id
        if shard.state == "planned":
            try:
                file_id = await self.api.upload(path, f"annotate-{shard.name}.jsonl")
            except Rejected as exc:
                return await self._refused(shard, path, exc)
            self.ledger.uploaded(shard.name, file_id)
        assert file_id is not None
        if not self.driver.budget.hold_now(shard.worst_usd):
            log.warning("batch file %s waits: its worst case ($%.4f) would pass limits.max_cost_usd",
                        shard.name, shard.worst_usd)
            return False
        try:
            batch = await self.api.create(file_id, {SHARD_KEY: shard.name}, shard.planned_at)
        except Rejected as exc:
            self.driver.budget.release(shard.worst_usd, 0.0)
            self._drop(shard, path)
            raise RunStopped(f"the provider would not make a batch of file {shard.name}: {exc}") from None
        self.ledger.created(shard.name, str(batch["id"]), batch.get("expires_at"), str(batch.get("status")))
        log.info("batch %s: %d rows of file %s", batch["id"], shard.lines, shard.name)
        return False

    async def _refused(self, shard: Shard, path: Path, exc: Rejected) -> bool:
        """The provider would not take a file: a 400 or 413 (too large, most often) sends its
        rows back to do in files half its size, and a file of one row it will not take is that
        row's error; anything else stops the run, its rows back to do."""
        if exc.status not in (400, 413):
            self._drop(shard, path)
            raise RunStopped(f"the provider refused batch file {shard.name}: {exc}")
        if shard.lines == 1:
            await self._record([(_with_notes(rows.failed(row, f"request: {exc}", tries, False), notes), exc.status)
                                for (row, notes), tries, _ in self.ledger.rows_of(shard.name)])
        else:
            log.warning("the provider refused batch file %s of %d rows (%s): its rows go in files half its size",
                        shard.name, shard.lines, exc)
            self.max_bytes = min(self.max_bytes, max(1, path.stat().st_size // 2))
            self.max_requests = min(self.max_requests, max(1, shard.lines // 2))
        self._drop(shard, path)
        return shard.lines > 1

    def _drop(self, shard: Shard, path: Path) -> None:
        """A file that never became a batch: its rows back to do, that try not counted."""
        self.ledger.give_back_try(shard.name)
        path.unlink(missing_ok=True)
        self.ledger.collected(shard.name)

    # --- waiting and collecting -------------------------------------------------------------

    async def _collect_ended(self) -> bool:
        """Look at each batch under way once, and collect those that ended; True when one did."""
        ended = False
        for shard in self.ledger.open_shards():
            if self._stopping() or shard.state != "created" or shard.batch_id is None:
                continue
            batch = await self._look(shard.batch_id)
            self.ledger.seen(shard.name, str(batch.get("status")))
            if batch.get("status") in ENDED:
                await self._collect(shard, batch)
                ended = True
        return ended

    async def _look(self, batch_id: str) -> dict[str, Any]:
        """A batch as the provider has it now (one it no longer has: ended, with nothing), its
        counts on the progress bar."""
        try:
            batch = await self.api.get(batch_id)
        except Rejected as exc:
            if exc.status != 404:
                raise
            log.warning("batch %s is gone from the provider: its rows are asked again", batch_id)
            return {"id": batch_id, "status": "gone"}
        counts = batch.get("request_counts") or {}
        self.counts[batch_id] = (counts.get("completed", 0), counts.get("failed", 0), counts.get("total", 0))
        done, failed, total = (sum(c[i] for c in self.counts.values()) for i in range(3))
        self.driver.bar.set_postfix_str(f"batches: {len(self.counts)}, lines answered {done} + failed {failed} "
                                        f"of {total}", refresh=True)
        return batch

    async def _collect(self, shard: Shard, batch: dict[str, Any]) -> None:
        """Journal what an ended batch answered; rows it did not answer go back to do (while they
        have tries left); its files are deleted, at the provider and here, before the ledger
        lets go of the shard, so a kill in between deletes them next time."""
        if batch.get("status") == "failed":
            log.warning("batch %s failed: %s", batch["id"], errors_of(batch))
            self.ledger.give_back_try(shard.name)  # it never ran: only smaller files will
            self.max_requests = min(self.max_requests, max(1, shard.lines // 2))
        lines = by_custom_id([await self._content(fid) for fid in _result_files(batch)])
        outcomes, charged = await self._verdicts(shard, batch, lines)
        await self._record(outcomes)
        self.driver.budget.release(shard.worst_usd, charged)
        for fid in [shard.file_id, *_result_files(batch)]:
            if fid:
                await self.api.delete(fid)
        (self.folder / f"{shard.name}.jsonl").unlink(missing_ok=True)
        self.ledger.collected(shard.name)

    async def _content(self, file_id: str) -> bytes:
        try:
            return await self.api.content(file_id)
        except Rejected as exc:
            if exc.status != 404:
                raise
            log.warning("file %s is gone from the provider: the rows it answered are asked again", file_id)
            return b""

    async def _verdicts(self, shard: Shard, batch: dict[str, Any],
                        lines: dict[str, dict[str, Any]]) -> tuple[list[Outcome], float]:
        """The outcomes to record of a shard's rows, and what its answers cost."""
        held = self.ledger.rows_of(shard.name)
        recorded = await asyncio.to_thread(self._already_done, [row.id for (row, _), _, _ in held])
        outcomes: list[Outcome] = []
        charged = 0.0
        for (row, notes), tries, carry in held:
            if row.id in recorded:
                continue  # journalled by a collection killed before the ledger heard: in a part now
            found = verdict(row, lines.get(row.id), batch, tries, self.reading, carry)
            charged += found.charged_usd
            if found.carry is not None:  # a paid answer that broke the schema: asked again, with what was wrong
                self.ledger.carry(row.id, found.carry)
            elif found.outcome is not None:
                outcomes.append((_with_notes({**found.outcome[0], "batch_id": batch["id"]}, notes), found.outcome[1]))
            elif tries > self.cfg.batch.resubmit:
                outcomes.append((_with_notes(_no_answer(row, found.why, tries), notes), None))
        return outcomes, charged

    def _already_done(self, ids: list[str]) -> set[str]:
        return set(self.driver.store.done.filter(pl.col("id").is_in(ids)).collect()["id"].to_list())


def _result_files(batch: dict[str, Any]) -> list[str]:
    return [str(fid) for fid in (batch.get("output_file_id"), batch.get("error_file_id")) if fid]


def _no_answer(row: ManifestRow, why: str, tries: int) -> dict[str, Any]:
    """A row no batch answered in `tries` batches: retryable, as the next run asks it again."""
    return rows.failed(row, f"request: {why}; in {tries} batches", tries, True)


def _with_notes(row: dict[str, Any], notes: str | None) -> dict[str, Any]:
    return {**row, "image_notes": notes} if notes else row
