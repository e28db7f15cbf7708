"""The Ray engine: the same run spread over a Ray cluster. The only module that imports ray.

The driver (the `annotate run` process) reads the manifest and subtracts the done ids as the
local engine does, then hands the rows still to do to Ray Data in waves. Image preparation runs
as Ray Data tasks on every CPU of the cluster (`payload.prepare`, unchanged); requests go out
from a small pool of async HTTP actors running the local engine's `Sender` and `Client`; their
outcomes stream back to the driver, which alone writes the store. The journal's primary key keeps
one row per id however often Ray re-runs a task after losing a node, so no merge step is needed.

One coordinator actor, pinned to the driver's node, holds the limiters of every endpoint and
the budget: each request start is one call to it, so a 429's cool-down pauses every actor on
the cluster, and the run's RPM, TPM and budget are global, not per actor. Each actor keeps its
share of the concurrency itself. Every row-level failure is an error row, never an exception:
an exception in a Ray Data function aborts the whole dataset.

Ray Data's own LLM processor and checkpointing are not used: its request rate is per actor and
knows no Retry-After or token limit, and its checkpoints are per block and only for plans that
end in a write, where the journal here is per row.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import os
import pickle
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from . import payload, results
from .budget import Budget
from .client import Client, read_key
from .config import EndpointConfig, LimitsConfig, RunConfig
from .errors import RowInputError
from .limits import LocalLimits
from .manifest import ManifestRow
from .pricing import PriceTable
from .runner import Driver, stopping_on_signals
from .sender import Outcome, Sender
from .structured import OutputSchema, labels

__all__ = ["run"]

log = logging.getLogger(__name__)

WAVE_ROWS = 20_000  # rows handed to Ray Data at a time: bounds what the driver and the object store hold
# An HTTP actor mostly waits on the network, and reserves no CPU: a fraction on each node would
# leave no node a whole CPU for a preparation task on small nodes, and the run would stall.
_HTTP_ACTOR_CPUS = 0


class Coordinator:
    """The run's limiters and budget, for the whole cluster (an async actor: one event loop)."""

    def __init__(self, limits: list[LimitsConfig], limit_usd: float | None, spent_usd: float) -> None:
        self.limits = LocalLimits.from_config(limits)
        self.budget = Budget(limit_usd, spent_usd)

    async def pick(self, tokens: int) -> int:
        return await self.limits.pick(tokens)

    async def pace(self, endpoint: int, tokens: int) -> None:
        await self.limits[endpoint].pace(tokens)

    async def settle(self, endpoint: int, reserved: int, actual: int) -> None:
        self.limits[endpoint].settle(reserved, actual)

    async def cool_down(self, endpoint: int, seconds: float) -> None:
        self.limits[endpoint].cool_down(seconds)

    async def hold(self, worst_usd: float) -> bool:
        return await self.budget.hold(worst_usd)

    async def release(self, worst_usd: float, actual_usd: float) -> None:
        self.budget.release(worst_usd, actual_usd)

    async def spending(self) -> tuple[float, bool]:
        return self.budget.spent_usd, self.budget.exhausted


_CoordinatorActor: Any = ray.remote(Coordinator)


class _RemoteLimiter:
    """One endpoint's limits on the coordinator; this actor's share of its concurrency here.
    Each request start is one call to the coordinator, and one more to settle its tokens when
    the endpoint has a tokens-per-minute limit."""

    def __init__(self, coordinator: Any, endpoint: int, slots: int, counts_tokens: bool) -> None:
        self._coordinator = coordinator
        self._endpoint = endpoint
        self._slots = asyncio.Semaphore(slots)
        self._counts_tokens = counts_tokens

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._slots:
            yield

    async def pace(self, tokens: int) -> None:
        await self._coordinator.pace.remote(self._endpoint, tokens)

    def settle(self, reserved: int, actual: int) -> None:
        if self._counts_tokens:
            self._coordinator.settle.remote(self._endpoint, reserved, actual)

    def cool_down(self, seconds: float) -> None:
        self._coordinator.cool_down.remote(self._endpoint, seconds)


class _RemoteLimits:
    def __init__(self, coordinator: Any, limiters: list[_RemoteLimiter]) -> None:
        self._coordinator = coordinator
        self._limiters = limiters

    def __getitem__(self, endpoint: int) -> _RemoteLimiter:
        return self._limiters[endpoint]

    async def pick(self, tokens: int) -> int:
        return 0 if len(self._limiters) == 1 else int(await self._coordinator.pick.remote(tokens))


class _RemotePurse:
    def __init__(self, coordinator: Any) -> None:
        self._coordinator = coordinator

    async def hold(self, worst_usd: float) -> bool:
        return bool(await self._coordinator.hold.remote(worst_usd))

    def release(self, worst_usd: float, actual_usd: float) -> None:
        self._coordinator.release.remote(worst_usd, actual_usd)


def _schema(cfg: RunConfig) -> OutputSchema | None:
    return labels(cfg.output_schema, cfg.request.structured)


def _prepare(cfg: RunConfig, root: Path, batch: pa.Table) -> pa.Table:
    """Ray Data task: each row's request, or its error outcome when an image cannot be sent."""
    schema = _schema(cfg)
    prepared: list[bytes | None] = []
    outcomes: list[bytes | None] = []
    for blob in batch.column("row").to_pylist():
        row: ManifestRow = pickle.loads(blob)
        try:
            prepared.append(pickle.dumps(payload.prepare(row, root, cfg.request, cfg.prompt, schema)))
            outcomes.append(None)
        except RowInputError as exc:
            prepared.append(None)
            outcomes.append(pickle.dumps((results.failed(row, f"image: {exc}", attempts=0, retryable=False), None)))
    return batch.append_column("prepared", pa.array(prepared, pa.binary())).append_column(
        "outcome", pa.array(outcomes, pa.binary()))


class _Http:
    """Ray Data actor: sends its block's rows through the local engine's Sender, many at once."""

    def __init__(self, cfg: RunConfig, endpoints: list[EndpointConfig], shares: list[int], coordinator: Any) -> None:
        self._cfg = cfg
        self._endpoints = endpoints
        self._shares = shares
        self._coordinator = coordinator
        self._sender: Sender | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _start(self) -> Sender:
        """Clients are made in the actor's event loop, as aiohttp wants; keys come from this
        node's environment."""
        cfg = self._cfg
        limiters = [_RemoteLimiter(self._coordinator, i, share, target.limits(cfg.limits).tokens_per_minute is not None)
                    for i, (share, target) in enumerate(zip(self._shares, cfg.targets))]
        limits = _RemoteLimits(self._coordinator, limiters)
        clients = [Client(endpoint, read_key(endpoint), limits[i], concurrency=self._shares[i],
                          max_attempts=cfg.limits.max_attempts) for i, endpoint in enumerate(self._endpoints)]
        purse = _RemotePurse(self._coordinator) if cfg.limits.max_cost_usd is not None else Budget(None)
        return Sender(cfg.request, clients, limits, purse, PriceTable(cfg.pricing), _schema(cfg), lambda: False)

    def __del__(self) -> None:
        """Ray Data drops the actor's function before the actor exits: close the connections
        in the loop that opened them."""
        if self._sender is not None and self._loop is not None and self._loop.is_running():
            closing = asyncio.run_coroutine_threadsafe(self._close(self._sender), self._loop)
            with contextlib.suppress(Exception):
                closing.result(timeout=5)

    @staticmethod
    async def _close(sender: Sender) -> None:
        for client in sender.clients:
            await client.aclose()

    async def __call__(self, batch: pa.Table) -> pa.Table:
        self._loop = asyncio.get_running_loop()
        sender = self._sender = self._sender or self._start()
        outcomes: list[bytes] = []

        async def deliver(outcome: Outcome) -> None:
            outcomes.append(pickle.dumps(outcome))

        async def one(row: bytes, prepared: bytes | None, outcome: bytes | None) -> None:
            if outcome is not None:
                outcomes.append(outcome)
            else:
                assert prepared is not None
                await sender.annotate(pickle.loads(row), pickle.loads(prepared), deliver)

        columns = (batch.column(name).to_pylist() for name in ("row", "prepared", "outcome"))
        await asyncio.gather(*itertools.starmap(one, zip(*columns)))
        return pa.table({"outcome": pa.array(outcomes, pa.binary())})


def _shares(concurrency: int, actors: int) -> int:
    return max(1, math.ceil(concurrency / actors))


def _connect(cfg: RunConfig) -> None:
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a run sends nothing anywhere but its endpoints
        ray.init(address=cfg.ray.address, include_dashboard=False, logging_level=logging.WARNING)
    context = ray.data.DataContext.get_current()  # imports ray.data, which sets up its loggers
    context.enable_progress_bars = False  # the run draws its own
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # a line per dataset, and a word on progress bars


def _waves(driver: Driver, limit: int | None, block_rows: int) -> Iterator[list[pa.Table]]:
    """The rows still to do, as blocks of pickled ManifestRows, WAVE_ROWS at a time."""
    wave: list[pa.Table] = []
    size = 0
    for batch in driver.todo(limit):
        for start in range(0, len(batch), block_rows):
            rows = batch[start:start + block_rows]
            wave.append(pa.table({"row": pa.array([pickle.dumps(row) for row in rows], pa.binary())}))
            size += len(rows)
        if size >= WAVE_ROWS:
            yield wave
            wave, size = [], 0
    if wave:
        yield wave


def _pipeline(cfg: RunConfig, wave: list[pa.Table], root: Path, endpoints: list[EndpointConfig],
              coordinator: Any) -> Any:
    actors = min(cfg.ray.http_actors, len(wave))  # an actor with no block to work on is never used
    shares = [_shares(target.limits(cfg.limits).concurrency, actors) for target in cfg.targets]
    in_flight = math.ceil(sum(shares) / cfg.ray.block_rows) + 1  # blocks an actor works on at once
    prep_args: dict[str, Any] = {"concurrency": cfg.ray.prep_tasks} if cfg.ray.prep_tasks else {}
    return (
        ray.data.from_arrow(wave)
        .map_batches(functools.partial(_prepare, cfg, root), batch_format="pyarrow", batch_size=None, num_cpus=1,
                     **prep_args)
        .map_batches(_Http, batch_format="pyarrow", batch_size=None, num_cpus=_HTTP_ACTOR_CPUS,
                     fn_constructor_kwargs={"cfg": cfg, "endpoints": endpoints, "shares": shares,
                                            "coordinator": coordinator},
                     compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=in_flight,
                                                        max_concurrent_calls_per_actor=in_flight),
                     udf_modifying_row_count=True)  # Ray Data spreads actors over the nodes by default
    )


def _drive(driver: Driver, endpoints: list[EndpointConfig], limit: int | None, coordinator: Any,
           quit: threading.Event) -> None:
    """The driver's loop, in a thread: waves in, outcomes journalled as they stream back."""
    cfg = driver.cfg
    root = driver.manifest.root
    for wave in _waves(driver, limit, cfg.ray.block_rows):
        seen: set[str] = set()  # a block Ray ran twice (after losing a node) comes back twice
        for batch in _pipeline(cfg, wave, root, endpoints, coordinator).iter_batches(
                batch_size=None, batch_format="pyarrow", prefetch_batches=4):
            if quit.is_set():
                return
            outcomes = [outcome for outcome in map(pickle.loads, batch.column("outcome").to_pylist())
                        if outcome[0]["id"] not in seen]
            seen.update(row["id"] for row, _ in outcomes)
            driver.record(outcomes)
            if driver.stopped():
                return
        _, exhausted = ray.get(coordinator.spending.remote())
        if exhausted:
            return


async def run(driver: Driver, endpoints: list[EndpointConfig], prices: PriceTable,
              schema: OutputSchema | None, limit: int | None) -> None:
    """The Ray engine (see the module's docstring); same arguments as the local engine."""
    cfg = driver.cfg
    _connect(cfg)  # in the main thread, where Ray can set its signal handlers
    here = ray.get_runtime_context().get_node_id()
    coordinator = _CoordinatorActor.options(  # a node that leaves takes its actors with it: stay by the driver
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False), num_cpus=0,
        max_concurrency=10_000,
    ).remote([target.limits(cfg.limits) for target in cfg.targets], driver.budget.limit_usd, driver.budget.spent_usd)
    quit = threading.Event()
    work = asyncio.ensure_future(asyncio.to_thread(_drive, driver, endpoints, limit, coordinator, quit))
    try:
        with stopping_on_signals(driver):
            await asyncio.shield(work)
    except asyncio.CancelledError:
        quit.set()  # the thread stops at its next batch; the store is closed only after
        await work
        raise
    finally:
        driver.budget.spent_usd, driver.budget.exhausted = ray.get(coordinator.spending.remote())
        ray.kill(coordinator)
