"""The asyncio loop that ties the stages together: rows in, one request each, results out.

Owns: the order of the stages, group commits to the store, progress, the summary, stopping
early when every request fails alike, and shutting down on a signal. Only the runner drives
the store and draws the progress bar.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from .. import payload
from ..store import columns as results
from ..cost.budget import Budget
from ..client import ACCOUNT_STATUSES, read_key
from ..config import EndpointConfig, RunConfig, fingerprint, fingerprint_changes
from ..errors import ConfigError, Interrupted, ManifestError, RowInputError, RunStopped, StoreError
from ..fetch import Fetcher
from ..images import is_remote
from ..limits import LocalLimits
from ..manifest import Manifest, ManifestRow
from ..cost.pricing import PriceTable
from ..sender import Outcome, Sender
from ..store.parts import Store
from ..structured import OutputSchema, labels

__all__ = ["Driver", "NO_KEY", "Summary", "run", "new_event_loop", "stopping_on_signals"]

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
NO_KEY = "no_key"  # the kind of failure of a row sent from a node where the key variable is unset
_Durable = tuple[dict[str, Any], int | str | None, "asyncio.Future[None]"]  # an Outcome, and what tells it is on disk


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
    held: str = ""  # the last time the pace was held below a configured limit: at what rate, and why

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
def _endpoint(cfg: EndpointConfig) -> Iterator[EndpointConfig]:
    """The endpoint to talk to: the configured one, or the bundled simulator it asks for."""
    if cfg.simulator is None:
        yield cfg
        return
    from ..simulator import server as simulator  # the server's libraries load only when a config asks for it

    with simulator.running(cfg.simulator) as sim:
        yield cfg.model_copy(update={"base_url": sim.url})


@contextlib.contextmanager
def _endpoints(targets: Sequence[EndpointConfig]) -> Iterator[list[EndpointConfig]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(_endpoint(target)) for target in targets]


@contextlib.contextmanager
def stopping_on_signals(driver: Driver) -> Iterator[None]:
    """A first SIGINT or SIGTERM lets requests in flight finish for up to GRACE_S and starts no
    new ones; a second cancels the running task at once (the journal holds every outcome the
    engine handed over). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    seen = []
    timers: list[asyncio.TimerHandle] = []

    def handle() -> None:
        seen.append(1)
        if len(seen) > 1:
            main.cancel()
            return
        driver.stopping = True
        log.warning("stopping: waiting up to %.0f s for requests in flight (signal again to stop now)", GRACE_S)
        timers.append(loop.call_later(GRACE_S, main.cancel))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handle)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        for timer in timers:
            timer.cancel()


class Driver:
    """What both engines share on the machine that runs `annotate`: the rows still to do, the one
    writer of the store, progress, the summary, and stopping when every row fails alike."""

    def __init__(self, cfg: RunConfig, manifest: Manifest, store: Store, bar: tqdm[Any], summary: Summary) -> None:
        self.cfg = cfg
        self.manifest = manifest
        self.store = store
        self.bar = bar
        self.summary = summary
        self.budget = Budget(cfg.limits.max_cost_usd, store.spent_usd)
        self.unpublished = 0  # rows journalled since the last part
        self.cut_at = time.monotonic()
        self.held: Callable[[], str] = str  # what holds the pace below the limits, if anything (set by an engine)
        self.stop_reason: str | None = None
        self.stopping = False  # a signal came: no new requests
        self.manifest_error: ManifestError | None = None
        self._alike: tuple[int | str | None, int] = (None, 0)
        self._writing = threading.Lock()  # an engine may still record from a thread while the run closes
        self._closed = False

    def stopped(self) -> bool:
        """True once no new request may start."""
        return bool(self.stop_reason or self.stopping or self.budget.exhausted)

    def todo(self, limit: int | None) -> Iterator[list[ManifestRow]]:
        """Manifest rows not done yet, each id once, in batches; a bad line far down the file
        ends them and stops the run once what is in flight is kept."""
        try:
            yield from self.manifest.batches(skip=self.store.done, limit=limit)
        except ManifestError as exc:
            self.manifest_error = exc
            self.stop_reason = f"the manifest could not be read on: {exc}"

    def record(self, outcomes: Sequence[Outcome]) -> None:
        """Journal outcomes in one transaction and count them; blocking, so engines call it off
        their event loop. A part is cut every PART_ROWS rows or PART_SECONDS. Outcomes that come
        after `close` are dropped: their rows stay to do."""
        with self._writing:
            if not self._closed:
                self._record(outcomes)

    def close(self) -> None:
        """The last part; a kill before this leaves it in the journal for next time."""
        with self._writing:
            self._closed = True
            self.store.close()

    def _record(self, outcomes: Sequence[Outcome]) -> None:
        if outcomes:
            self.store.record([row for row, _ in outcomes])
        for row, kind in outcomes:
            self._watch_alike(kind, row)
            self.summary.count(row, retried=row["id"] in self.store.failed_before)
        self.unpublished += len(outcomes)
        self.bar.update(len(outcomes))
        self.bar.set_postfix(self._postfix(), refresh=False)
        if self.unpublished >= PART_ROWS or time.monotonic() - self.cut_at >= PART_SECONDS:
            self.store.cut()
            self.unpublished = 0
            self.cut_at = time.monotonic()

    def _watch_alike(self, kind: int | str | None, row: dict[str, Any]) -> None:
        """Stop after ACCOUNT_STOP_AFTER failures in a row of one kind that every row would meet:
        an account-level status, or an endpoint that refuses the response_format."""
        alike = kind in ACCOUNT_STATUSES or kind in ("response_format", NO_KEY)
        last, streak = self._alike
        streak = streak + 1 if alike and kind == last else int(alike)
        self._alike = (kind, streak)
        if streak >= ACCOUNT_STOP_AFTER and not self.stop_reason:
            keys = ", ".join(f"${target.api_key_env}" for target in self.cfg.targets)
            advice = "" if kind in ("response_format", NO_KEY) else f"; check the key in {keys}, the account and request.model"
            self.stop_reason = f"{streak} requests in a row failed alike ({row['error']}){advice}"

    def _postfix(self) -> dict[str, Any]:
        s, limit = self.summary, self.budget.limit_usd
        cost = f"${s.cost_usd:.4f}" + (f" (dir ${self.budget.spent_usd:.4f} of ${limit:g})" if limit else "")
        if held := self.held():
            s.held = held
        return {"errors": s.failed, "tokens": s.prompt_tokens + s.completion_tokens, **({"cost": cost} if s.priced else {}),
                **({"pace": held} if held else {})}


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
                await deliver((results.failed(row, f"image: {exc}", attempts=0, retryable=exc.retryable), None))
                continue
            remote = not self.inlined and any(map(is_remote, row.images))
            await self.sender.annotate(row, prepared, deliver,
                                       functools.partial(self._prepare, row, inline=True) if remote else None)
        await out.put(None)

    async def _prepare(self, row: ManifestRow, inline: bool) -> payload.Prepared:
        """The row's request, its remote images fetched first when `inline`."""
        cfg = self.driver.cfg
        fetched = await self.fetcher.fetch_all(row.images) if inline else {}
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


def _check_identity(store: Store, cfg: RunConfig, total: int, force: bool) -> None:
    """Refuse to mix answers of two different configs in one directory, unless forced."""
    now = fingerprint(cfg)
    before = store.read_run_info()
    if before and not force and (changed := fingerprint_changes(before.get("fingerprint", {}), now)):
        raise StoreError(f"output.dir: {cfg.output.dir} holds answers to another config ({'; '.join(changed)}); "
                         "use another output dir, or --force to mix them on purpose")
    runs = (before or {}).get("runs", [])
    config = cfg.model_dump(mode="json")
    for section in [config["endpoint"], *config["endpoints"]]:
        section["headers"] = sorted(section["headers"])  # names only: values may be private
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
    """Run, or resume, one job on the engine the config names. Raises ConfigError,
    ManifestError or StoreError before sending anything, RunStopped when every request fails
    alike, Interrupted on SIGINT or SIGTERM."""
    started = time.monotonic()
    prices = PriceTable(cfg.pricing)
    if cfg.limits.max_cost_usd is not None and prices.find(cfg.request.model) is None:
        raise ConfigError(f"limits.max_cost_usd: no price is known for {cfg.request.model}, so a budget cannot "
                          "be kept; add the model under pricing:")
    if cfg.limits.max_cost_usd is not None and cfg.request.max_tokens is None:
        raise ConfigError("limits.max_cost_usd: a budget needs request.max_tokens, the cap on what an answer costs")
    for target in cfg.targets:
        read_key(target)  # an unset key is exit 2 here, before anything is sent
    engine = _engine(cfg)
    manifest = Manifest(cfg.input, cfg.prompt)
    schema = labels(cfg.output_schema, cfg.request.structured)
    if schema is not None and schema.not_strict:
        log.warning("output_schema is asked for with strict: false (%s): the provider may answer outside it, "
                    "and such answers are asked again", schema.not_strict)
    columns = results.schema(manifest.keep_schema, schema.fields if schema else ())  # a clashing field: exit 2 now
    total = await asyncio.to_thread(manifest.count)
    with _endpoints(cfg.targets) as endpoints:
        store = await asyncio.to_thread(_open_store, cfg, columns, total, retry_failed, force)
        summary = Summary(output_dir=cfg.output.dir, total=total, resumed=store.resumed,
                          failed_before=store.failed_for_good)
        if prices.find(cfg.request.model) is None:
            log.warning("no price known for %s: cost_usd stays empty (add it under pricing:)", cfg.request.model)
        done_before = summary.resumed + summary.failed_before
        todo = total if limit is None else min(total, done_before + limit)
        with tqdm(total=todo, initial=done_before, unit="row", disable=not progress, dynamic_ncols=True) as bar:
            driver = Driver(cfg, manifest, store, bar, summary)
            try:
                await engine(driver, endpoints, schema, limit)
            except asyncio.CancelledError:
                driver.stopping = True
            finally:
                driver.close()
    summary.elapsed_s = time.monotonic() - started
    summary.budget_usd, summary.spent_usd = cfg.limits.max_cost_usd, driver.budget.spent_usd
    summary.stopped_at_budget = driver.budget.exhausted
    if driver.stopping:
        raise Interrupted(f"interrupted; {summary.ok + summary.failed} rows answered now are in "
                          f"{cfg.output.dir}; run the same command again to resume")
    if driver.manifest_error and summary.ok + summary.failed == 0:
        raise driver.manifest_error  # nothing was sent: a bad manifest, exit 2
    if driver.stop_reason:
        raise RunStopped(driver.stop_reason)
    return summary


Engine = Callable[[Driver, list[EndpointConfig], OutputSchema | None, int | None], Awaitable[None]]


def _engine(cfg: RunConfig) -> Engine:
    if cfg.engine == "local":
        return _run_locally
    try:
        from . import ray as ray_engine  # the only module that imports ray, an optional extra
    except ImportError as exc:
        raise ConfigError(f"engine: ray needs Ray ({exc}); pip install 'annotate-pipeline[ray]'") from None
    return ray_engine.run


async def _run_locally(driver: Driver, endpoints: list[EndpointConfig], schema: OutputSchema | None,
                       limit: int | None) -> None:
    cfg = driver.cfg
    own = [target.limits(cfg.limits) for target in cfg.targets]
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
