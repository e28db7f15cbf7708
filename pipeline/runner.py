"""The asyncio loop that ties the stages together: rows in, one request each, results out.

Owns: the order of the stages, group commits to the store, progress, the summary, stopping
early when every request fails alike, and shutting down on a signal. Only the runner drives
the store and draws the progress bar.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from . import images, payload, results
from .client import ACCOUNT_STATUSES, Client, read_key
from .completion import Reply
from .config import EndpointConfig, RunConfig, fingerprint, fingerprint_changes
from .errors import ConfigError, Interrupted, ManifestError, Rejected, RequestFailed, RowInputError, RunStopped, StoreError
from .limits import Limiter
from .budget import Budget
from .manifest import Manifest, ManifestRow
from .pricing import PriceTable
from .store import Store
from .structured import OutputSchema, Unusable, labels

__all__ = ["Summary", "run", "new_event_loop"]

new_event_loop: Callable[[], asyncio.AbstractEventLoop]
try:  # uvloop takes about a tenth less CPU per request than asyncio's own loop
    from uvloop import new_event_loop
except ImportError:  # Windows, where uvloop does not install
    new_event_loop = asyncio.new_event_loop

log = logging.getLogger(__name__)

PART_ROWS = 5_000  # a part is cut from the journal after this many rows ...
PART_SECONDS = 30.0  # ... or this many seconds, whichever comes first
GROUP_ROWS = 512  # at most this many outcomes share one journal transaction
GRACE_S = 30.0  # after a first signal, in-flight requests get this long to finish
# This many outcomes in a row with the same account-level status (401, 403, 404) stop the
# run: a wrong key or model name would otherwise fail every row of the manifest one by one.
ACCOUNT_STOP_AFTER = 3
_SIMULATOR_KEY = "simulator"
# an output row, and what makes its failure alike others (see _watch_alike) ...
_Outcome = tuple[dict[str, Any], int | str | None]
_Durable = tuple[dict[str, Any], int | str | None, "asyncio.Future[None]"]  # ... and what tells it is on disk


@dataclass(frozen=True)
class _Paid:
    """A reply and what it cost: `cost` by the provider's usage, `charged` what the budget counted."""

    reply: Reply
    cost: float | None
    charged: float | None

    def then(self, later: _Paid) -> _Paid:
        """A follow-up's reply, with both requests' usage and cost."""
        def add(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else a + b

        return _Paid(later.reply.after(self.reply), add(self.cost, later.cost), add(self.charged, later.charged))

    def row(self, row: ManifestRow, values: dict[str, Any] | None = None, choice: int = 0) -> dict[str, Any]:
        return results.answered(row, self.reply, self.cost, self.charged, values, choice)


def _first_fit(schema: OutputSchema, reply: Reply) -> tuple[int, dict[str, Any] | None, str]:
    """The first choice that fits the schema and its values, or what was wrong with the first."""
    problem = ""
    for i, text in enumerate(reply.answers):
        try:
            return i, schema.read(text), ""
        except Unusable as exc:
            problem = problem or str(exc)
    if reply.finish_reason == "length":
        problem += " (cut at request.max_tokens: raise it)"
    return 0, None, problem


@dataclass
class Summary:
    output_dir: Path
    total: int = 0  # rows in the manifest
    resumed: int = 0  # answered by earlier runs
    ok: int = 0
    failed: int = 0
    retried: int = 0  # rows that had failed in an earlier run and were asked again
    failed_before: int = 0  # rows that failed for good in earlier runs and were not asked again
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    priced: bool = True  # False when some answered row had no known price
    elapsed_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    budget_usd: float | None = None  # limits.max_cost_usd
    spent_usd: float = 0.0  # by the directory, earlier runs included
    stopped_at_budget: bool = False

    def count(self, row: dict[str, Any], retried: bool) -> None:
        self.retried += retried
        if "prompt_tokens" in row:  # answered, perhaps unparseable: paid for either way
            self.prompt_tokens += row["prompt_tokens"] or 0
            self.completion_tokens += row["completion_tokens"] or 0
            if row["cost_usd"] is None:
                self.priced = False
            else:
                self.cost_usd += row["cost_usd"]
        if row["status"] == "ok":
            self.ok += 1
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
    from . import simulator  # the server's libraries load only when a config asks for it

    with simulator.running(cfg.simulator) as sim:
        yield cfg.model_copy(update={"base_url": sim.url}), read_key(cfg, fallback=_SIMULATOR_KEY)


@contextlib.contextmanager
def _on_signals(first: Callable[[], None], second: Callable[[], None]) -> Iterator[None]:
    """SIGINT and SIGTERM call `first`, and any later one `second` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    seen = []

    def handle() -> None:
        seen.append(1)
        (first if len(seen) == 1 else second)()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handle)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


class _Run:
    def __init__(self, cfg: RunConfig, manifest: Manifest, store: Store, client: Client, limiter: Limiter,
                 prices: PriceTable, bar: tqdm[Any], summary: Summary, schema: OutputSchema | None) -> None:
        self.cfg = cfg
        self.manifest = manifest
        self.store = store
        self.client = client
        self.limiter = limiter
        self.bar = bar
        self.summary = summary
        self.prices = prices
        self.labels = schema
        self.budget = Budget(cfg.limits.max_cost_usd, store.spent_usd)
        self._settled = asyncio.Event()
        self.unpublished = 0  # rows journalled since the last part
        self.cut_at = time.monotonic()
        self.stop_reason: str | None = None
        self.stopping = False  # a signal came: no new requests
        self.manifest_error: ManifestError | None = None
        self._account_streak: tuple[int | str | None, int] = (None, 0)

    async def rows(self, limit: int | None) -> AsyncIterator[ManifestRow]:
        """Manifest rows not done yet, each id once, read off the event loop."""
        batches = self.manifest.batches(skip=self.store.done, limit=limit)
        while batch := await asyncio.to_thread(next, batches, None):
            for row in batch:
                yield row

    async def produce(self, queue: asyncio.Queue[ManifestRow | None], workers: int, limit: int | None) -> None:
        try:
            async for row in self.rows(limit):
                if self.stop_reason or self.stopping or self.budget.exhausted:
                    break
                await queue.put(row)  # waits while the queue is full: memory stays flat
        except ManifestError as exc:  # a bad line far down the file: keep what is in flight, then stop
            self.manifest_error = exc
            self.stop_reason = f"the manifest could not be read on: {exc}"
        for _ in range(workers):
            await queue.put(None)

    async def work(self, queue: asyncio.Queue[ManifestRow | None], out: asyncio.Queue[_Durable | None]) -> None:
        while (row := await queue.get()) is not None:
            if not (self.stop_reason or self.stopping or self.budget.exhausted):
                await self.annotate(row, out)
        await out.put(None)

    async def annotate(self, row: ManifestRow, out: asyncio.Queue[_Durable | None]) -> None:
        """One row's outcome, handed to the journal. Row-level failures become error rows here
        and nowhere else."""
        prompt, request = self.cfg.prompt, self.cfg.request
        try:
            parts = await asyncio.to_thread(images.to_parts, row.images, self.manifest.root, prompt.max_side)
        except RowInputError as exc:
            await self._journal(out, results.failed(row, f"image: {exc}", attempts=0, retryable=False), None)
            return
        body = payload.build(row, parts, request, prompt, self.labels)
        tokens = payload.estimate(row, parts, request, prompt, self.labels)
        # The slot is held until the answer is on disk, so a kill loses at most `concurrency` answers.
        async with self.limiter.slot():
            try:
                paid = await self._send(body, tokens)
            except RequestFailed as exc:
                await self._journal(out, *self._failed(row, exc))
                return
            if paid is None:
                return  # not sent: the row stays to do
            outcome = await self._read(row, body, tokens, paid) if self.labels else paid.row(row)
            await self._journal(out, outcome, None)

    async def _send(self, body: dict[str, Any], tokens: payload.TokenEstimate) -> _Paid | None:
        """One request within the limits and the budget; None when it was not sent (the budget
        ran out, or a signal came)."""
        reserved = tokens.input + tokens.output_max  # what a tokens-per-minute limit counts
        worst = self.prices.list_usd(self.cfg.request.model, tokens.input_max, tokens.output_max) or 0.0
        while not self.budget.reserve(worst):
            if self.budget.exhausted:
                return None
            await self._settled.wait()  # in-flight requests may cost less than they hold
        if self.stop_reason or self.stopping:
            self._settle(worst, 0.0)
            return None
        try:
            reply = await self.client.complete(body, reserved)
        except RequestFailed:
            self._settle(worst, 0.0)  # errors are not billed
            raise
        if reply.usage:
            self.limiter.settle(reserved, reply.usage.prompt_tokens + tokens.output_max)
        cost = self._cost(reply)
        charged = worst if cost is None else cost  # no usage: assume the worst
        self._settle(worst, charged)
        return _Paid(reply, cost, charged if worst else None)

    async def _read(self, row: ManifestRow, body: dict[str, Any], tokens: payload.TokenEstimate,
                    paid: _Paid) -> dict[str, Any]:
        """The typed columns of the first choice that fits the schema, asking again up to
        request.parse_retries times with what was wrong; else a parse_error row keeping the
        raw answer. Every request's usage counts in the row."""
        assert self.labels is not None
        retries = self.cfg.request.parse_retries
        while True:
            choice, values, problem = _first_fit(self.labels, paid.reply)
            if values is not None:
                return paid.row(row, values, choice)
            if retries == 0 or paid.reply.refusal:
                break
            retries -= 1
            follow = self.labels.ask_again(paid.reply.answers[0], problem)
            body, tokens = payload.follow_up(body, tokens, follow, self.cfg.request.model)
            try:
                more = await self._send(body, tokens)
            except RequestFailed as exc:
                problem += f" (asking again failed: {exc})"
                break
            if more is None:
                break
            paid = paid.then(more)
        if paid.reply.refusal:
            problem = f"is a refusal: {paid.reply.refusal}"
        return results.unparsed(row, paid.reply, paid.cost, paid.charged, problem)

    def _failed(self, row: ManifestRow, exc: RequestFailed) -> tuple[dict[str, Any], int | str | None]:
        """The error row of a request that failed, and what makes failures alike (see _watch_alike)."""
        if isinstance(exc, Rejected) and exc.status == 400 and self.labels and "response_format" in str(exc):
            fallback = "json_object (or prompt)" if self.labels.mode == "json_schema" else "prompt"
            message = f"request: {exc}; the endpoint refuses this response_format: set request.structured: {fallback}"
            return results.failed(row, message, exc.attempts, retryable=True), "response_format"
        # a 4xx is final, unless it says the key or the account is wrong: fix those and rerun
        retryable = not isinstance(exc, Rejected) or exc.status in ACCOUNT_STATUSES
        return results.failed(row, f"request: {exc}", exc.attempts, retryable), exc.status

    def _settle(self, worst_usd: float, actual_usd: float) -> None:
        self.budget.settle(worst_usd, actual_usd)
        self._settled.set()  # wake requests waiting for room in the budget
        self._settled = asyncio.Event()

    @staticmethod
    async def _journal(out: asyncio.Queue[_Durable | None], row: dict[str, Any], kind: int | str | None) -> None:
        """Hand an outcome to the collector and wait until it is on disk."""
        durable: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await out.put((row, kind, durable))
        await durable

    def _cost(self, reply: Reply) -> float | None:
        if reply.usage is None:
            return None
        model = reply.model if reply.model and self.prices.find(reply.model) else self.cfg.request.model
        return self.prices.cost_usd(model, reply.usage)

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
            if outcomes:
                await asyncio.to_thread(self.store.record, [row for row, _, _ in outcomes])
                self._done([(row, status) for row, status, _ in outcomes])
                for _, _, durable in outcomes:
                    durable.set_result(None)
            if self.unpublished >= PART_ROWS or time.monotonic() - self.cut_at >= PART_SECONDS:
                await asyncio.to_thread(self.cut)

    def _done(self, outcomes: list[_Outcome]) -> None:
        for row, status in outcomes:
            self._watch_alike(status, row)
            self.summary.count(row, retried=row["id"] in self.store.failed_before)
        self.unpublished += len(outcomes)
        self.bar.update(len(outcomes))
        self.bar.set_postfix(self._postfix(), refresh=False)

    def cut(self) -> None:
        self.store.cut()
        self.unpublished = 0
        self.cut_at = time.monotonic()

    def _watch_alike(self, kind: int | str | None, row: dict[str, Any]) -> None:
        """Stop after ACCOUNT_STOP_AFTER failures in a row of one kind that every row would meet:
        an account-level status, or an endpoint that refuses the response_format."""
        alike = kind in ACCOUNT_STATUSES or kind == "response_format"
        last, streak = self._account_streak
        streak = streak + 1 if alike and kind == last else int(alike)
        self._account_streak = (kind, streak)
        if streak >= ACCOUNT_STOP_AFTER and not self.stop_reason:
            advice = "" if kind == "response_format" else (
                f"; check the key in ${self.cfg.endpoint.api_key_env}, the account and request.model")
            self.stop_reason = f"{streak} requests in a row failed alike ({row['error']}){advice}"

    def _postfix(self) -> dict[str, Any]:
        s, limit = self.summary, self.budget.limit_usd
        cost = f"${s.cost_usd:.4f}" + (f" (dir ${self.budget.spent_usd:.4f} of ${limit:g})" if limit else "")
        return {"errors": s.failed, "tokens": s.prompt_tokens + s.completion_tokens, **({"cost": cost} if s.priced else {})}


def _check_identity(store: Store, cfg: RunConfig, total: int, force: bool) -> None:
    """Refuse to mix answers of two different configs in one directory, unless forced."""
    now = fingerprint(cfg)
    before = store.read_run_info()
    if before and not force and (changed := fingerprint_changes(before.get("fingerprint", {}), now)):
        raise StoreError(f"output.dir: {cfg.output.dir} holds answers to another config ({'; '.join(changed)}); "
                         "use another output dir, or --force to mix them on purpose")
    runs = (before or {}).get("runs", [])
    config = cfg.model_dump(mode="json")
    config["endpoint"]["headers"] = sorted(cfg.endpoint.headers)  # names only: values may be private
    store.write_run_info({
        "fingerprint": now,
        "manifest": {"path": str(cfg.input.manifest.resolve()), "rows": total},
        "runs": [*runs, {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "forced": force}],
        "config": config,
    })


def _open_store(cfg: RunConfig, columns: pa.Schema, total: int, retry_failed: bool, force: bool) -> Store:
    store = Store(cfg.output.dir, columns, journal=cfg.output.journal, retry_failed=retry_failed)
    try:
        _check_identity(store, cfg, total, force)
    except BaseException:
        store.close()
        raise
    return store


async def run(cfg: RunConfig, *, limit: int | None = None, progress: bool = True, retry_failed: bool = False,
              force: bool = False) -> Summary:
    """Run, or resume, one job. Raises ConfigError, ManifestError or StoreError before sending
    anything, RunStopped when every request fails alike, Interrupted on SIGINT or SIGTERM."""
    started = time.monotonic()
    prices = PriceTable(cfg.pricing)
    if cfg.limits.max_cost_usd is not None and prices.find(cfg.request.model) is None:
        raise ConfigError(f"limits.max_cost_usd: no price is known for {cfg.request.model}, so a budget cannot "
                          "be kept; add the model under pricing:")
    if cfg.limits.max_cost_usd is not None and cfg.request.max_tokens is None:
        raise ConfigError("limits.max_cost_usd: a budget needs request.max_tokens, the cap on what an answer costs")
    manifest = Manifest(cfg.input, cfg.prompt)
    schema = labels(cfg.output_schema, cfg.request.structured)
    columns = results.schema(manifest.keep_schema, schema.fields if schema else ())  # a clashing field: exit 2 now
    total = await asyncio.to_thread(manifest.count)
    with _endpoint(cfg.endpoint) as (endpoint, key):
        store = await asyncio.to_thread(_open_store, cfg, columns, total, retry_failed, force)
        summary = Summary(output_dir=cfg.output.dir, total=total, resumed=store.resumed,
                          failed_before=store.failed_for_good)
        if prices.find(cfg.request.model) is None:
            log.warning("no price known for %s: cost_usd stays empty (add it under pricing:)", cfg.request.model)
        limiter = Limiter.from_config(cfg.limits)
        client = Client(endpoint, key, limiter, concurrency=cfg.limits.concurrency,
                        max_attempts=cfg.limits.max_attempts)
        done_before = summary.resumed + summary.failed_before
        todo = total if limit is None else min(total, done_before + limit)
        with tqdm(total=todo, initial=done_before, unit="row", disable=not progress, dynamic_ncols=True) as bar:
            state = _Run(cfg, manifest, store, client, limiter, prices, bar, summary, schema)
            try:
                await _pump(state, cfg.limits.concurrency, limit)
            except asyncio.CancelledError:
                state.stopping = True
            finally:
                try:
                    store.close()  # the last part; a kill before this leaves it in the journal for next time
                finally:
                    await client.aclose()
    summary.elapsed_s = time.monotonic() - started
    summary.budget_usd, summary.spent_usd = cfg.limits.max_cost_usd, state.budget.spent_usd
    summary.stopped_at_budget = state.budget.exhausted
    if state.stopping:
        raise Interrupted(f"interrupted; {summary.ok + summary.failed} rows answered now are in "
                          f"{cfg.output.dir}; run the same command again to resume")
    if state.manifest_error and summary.ok + summary.failed == 0:
        raise state.manifest_error  # nothing was sent: a bad manifest, exit 2
    if state.stop_reason:
        raise RunStopped(state.stop_reason)
    return summary


async def _pump(state: _Run, concurrency: int, limit: int | None) -> None:
    # More workers than request slots, so the next rows' images are ready when a slot frees.
    workers = concurrency + max(2, concurrency // 4)
    queue: asyncio.Queue[ManifestRow | None] = asyncio.Queue(maxsize=2 * workers)
    out: asyncio.Queue[_Durable | None] = asyncio.Queue(maxsize=2 * workers)
    tasks = [asyncio.create_task(state.produce(queue, workers, limit)),
             *(asyncio.create_task(state.work(queue, out)) for _ in range(workers)),
             asyncio.create_task(state.collect(out, workers))]
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()

    def stop_gently() -> None:  # no new requests; those in flight get GRACE_S to finish
        state.stopping = True
        log.warning("stopping: waiting up to %.0f s for requests in flight (signal again to stop now)", GRACE_S)
        loop.call_later(GRACE_S, main.cancel)

    def stop_now() -> None:  # the journal holds every outcome received: nothing is lost
        main.cancel()

    try:
        with _on_signals(stop_gently, stop_now):
            await asyncio.gather(*tasks)  # the first failure ends the run
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
