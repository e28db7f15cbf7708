"""The Ray engine's stages: the same run spread over a Ray cluster.

The driver (the `annotate run` process) reads the manifest and subtracts the done ids as the
local engine does, then hands the rows still to do to Ray Data in waves. Image preparation runs
as Ray Data tasks on every CPU of the cluster (`payload.prepare`, unchanged); requests go out
from a small pool of async HTTP actors running the local engine's `Sender` and `Client`; their
outcomes stream back to the driver, which alone writes the store. The journal's primary key keeps
one row per id however often Ray re-runs a task after losing a node, so no merge step is needed.

One coordinator actor (`coordinator.py`) holds the run's limits and budget for the whole
cluster. Every row-level failure is an error row, never an exception: an exception in a Ray
Data function aborts the whole dataset.

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
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ... import objects, payload, rows
from ...config import EndpointConfig, RunConfig
from ...cost.budget import Budget
from ...errors import ConfigError, RowInputError
from ...fetch import Fetcher, fetch_rows
from ...images import is_remote
from ...manifest import ManifestRow
from ...sender import Outcome, Sender
from ...structured import OutputSchema, build_schema
from ..driver import NO_KEY, Driver, stopping_on_signals
from .coordinator import (
    CoordinatorActor,
    RemoteLimiter,
    RemoteLimits,
    RemotePurse,
)

__all__ = ["run"]

log = logging.getLogger(__name__)

HELD_EVERY_S = 1.0  # how often the driver asks what holds the pace, for the progress bar
QUIT_WAIT_S = 10.0  # after a stop that cannot wait, how long the driver's thread may take to let go
RESERVATION_EXPIRES_S = 30  # three of Ray Data's renewals (see _connect)
WAVE_ROWS = 20_000  # rows handed to Ray Data at a time: bounds what the driver and the object store hold
# An HTTP actor mostly waits on the network, and reserves no CPU: a fraction on each node would
# leave no node a whole CPU for a preparation task on small nodes, and the run would stall.
_HTTP_ACTOR_CPUS = 0


def _schema(cfg: RunConfig) -> OutputSchema | None:
    """The output schema, made again on each worker from the config: its validator does not
    pickle, so the driver's cannot be shipped (0.3 ms for the demo's, once a block)."""
    return build_schema(cfg.output_schema, cfg.request.structured)


def _prepare(cfg: RunConfig, root: Path, coordinator: Any, batch: pa.Table) -> pa.Table:
    """Ray Data task: each row's request, or its error outcome when an image cannot be sent;
    neither once the run is stopping (the rows stay to do)."""
    schema = _schema(cfg)
    objects.use_options(cfg.storage_options)  # a worker's process: the environment is this node's
    prepared: list[bytes | None] = []
    outcomes: list[bytes | None] = []
    stopping = ray.get(coordinator.is_stopping.remote())
    todo: list[ManifestRow] = [pickle.loads(blob) for blob in batch.column("row").to_pylist()] if not stopping else []
    inline = cfg.input.remote == "inline"
    fetch = any(objects.is_object_url(ref) or inline and is_remote(ref) for row in todo for ref in row.images)
    fetched = fetch_rows(cfg.input.fetch, [row.images for row in todo], inline) if fetch else [{}] * len(todo)
    for row, remote in zip(todo, fetched):
        try:
            if isinstance(remote, RowInputError):
                raise remote
            prepared.append(pickle.dumps(payload.prepare(row, root, cfg.request, cfg.prompt, schema, remote)))
            outcomes.append(None)
        except RowInputError as exc:
            prepared.append(None)
            outcomes.append(pickle.dumps((rows.image_failed(row, exc), None)))
    if stopping:
        prepared = outcomes = [None] * batch.num_rows
    return batch.append_column("prepared", pa.array(prepared, pa.binary())).append_column(
        "outcome", pa.array(outcomes, pa.binary()))


class _Http:
    """Ray Data actor: sends its block's rows through the local engine's Sender, many at once."""

    def __init__(self, cfg: RunConfig, root: Path, endpoints: list[EndpointConfig], shares: list[int],
                 coordinator: Any) -> None:
        self._cfg = cfg
        self._root = root
        objects.use_options(cfg.storage_options)
        self._fetcher = Fetcher(cfg.input.fetch)  # with input.remote: pass, for an image the provider could not fetch
        self._endpoints = endpoints
        self._shares = shares
        self._coordinator = coordinator
        self._sender: Sender | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._owner = (ray.get_runtime_context().get_actor_id() or "", uuid.uuid4().hex)
        ray.get(coordinator.begin.remote(self._owner))  # before any hold of this life
        self._missing_key: ConfigError | None = None

    def _start(self) -> Sender:
        """Made in the actor's event loop; keys come from this node's environment (ConfigError
        when one is unset here)."""
        cfg = self._cfg
        limiters = [RemoteLimiter(self._coordinator, i, share) for i, share in enumerate(self._shares)]
        purse = RemotePurse(self._coordinator, self._owner) if cfg.limits.max_cost_usd is not None else Budget(None)
        return Sender(cfg, self._endpoints, self._shares, RemoteLimits(self._coordinator, limiters), purse,
                      _schema(cfg), lambda: False)

    async def _inline(self, row: ManifestRow, sender: Sender) -> payload.Prepared:
        """The row prepared again with its remote images fetched and inlined."""
        cfg = self._cfg
        fetched = await self._fetcher.fetch_all(row.images)
        return await asyncio.to_thread(payload.prepare, row, self._root, cfg.request, cfg.prompt, sender.schema, fetched)

    async def _close(self, sender: Sender) -> None:
        await sender.aclose()
        await self._fetcher.aclose()

    def __del__(self) -> None:
        """Ray Data drops the actor's function before the actor exits: close the connections
        in the loop that opened them."""
        if self._sender is not None and self._loop is not None and self._loop.is_running():
            closing = asyncio.run_coroutine_threadsafe(self._close(self._sender), self._loop)
            with contextlib.suppress(Exception):
                closing.result(timeout=5)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        self._loop = asyncio.get_running_loop()
        if self._sender is None and self._missing_key is None:
            try:
                self._sender = self._start()
            except ConfigError as exc:  # error rows, and the driver stops: never an exception here
                self._missing_key = exc
        sender = self._sender
        outcomes: list[bytes] = []

        async def deliver(outcome: Outcome) -> None:
            outcomes.append(pickle.dumps(outcome))

        async def one(row: bytes, prepared: bytes | None, outcome: bytes | None) -> None:
            if outcome is not None:  # an image that could not be prepared
                outcomes.append(outcome)
            elif prepared is None:  # not prepared: the run was stopping
                return
            elif sender is None:
                message = f"request: {self._missing_key} on node {socket.gethostname()}"
                await deliver((rows.failed(pickle.loads(row), message, attempts=0, retryable=True), NO_KEY))
            else:
                request: ManifestRow = pickle.loads(row)
                remote = self._cfg.input.remote == "pass" and any(map(is_remote, request.images))
                await sender.annotate(request, pickle.loads(prepared), deliver,
                                      functools.partial(self._inline, request, sender) if remote else None)

        columns = (batch.column(name).to_pylist() for name in ("row", "prepared", "outcome"))
        await asyncio.gather(*itertools.starmap(one, zip(*columns)))
        return pa.table({"outcome": pa.array(outcomes, pa.binary())})


def _connect(cfg: RunConfig) -> None:
    # Ray Data splits each node's CPUs evenly, rounded down, among the datasets that hold a
    # reservation on the cluster; a dataset renews its reservation every 10 s, and by default it
    # lapses 180 s after the last renewal (then shared out again within 20 s, or when a dataset
    # starts). A killed run's dataset would so starve the next run for over three minutes (on
    # nodes of one CPU: no CPU at all, one preparation task at a time).
    # Read when ray.data is first imported.
    os.environ.setdefault("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", str(RESERVATION_EXPIRES_S))
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a run sends nothing anywhere but its endpoints
        ray.init(address=cfg.ray.address, include_dashboard=False, logging_level=logging.WARNING)
    context = ray.data.DataContext.get_current()  # imports ray.data, which sets up its loggers
    context.enable_progress_bars = False  # the run draws its own
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # a line per dataset, and a word on progress bars


def _waves(driver: Driver, limit: int | None, block_rows: int) -> Iterator[list[pa.Table]]:
    """The rows still to do, as blocks of pickled ManifestRows, in waves of WAVE_ROWS or a
    manifest batch more."""
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
    concurrency = [limits.concurrency for limits in cfg.target_limits]
    # no more actors than blocks to work on, nor than an endpoint has slots to share out
    actors = min(cfg.ray.http_actors, len(wave), *concurrency)
    shares = [slots // actors for slots in concurrency]  # rounded down: never more in flight than allowed
    in_flight = math.ceil(sum(shares) / cfg.ray.block_rows) + 1  # blocks an actor works on at once
    prep_args: dict[str, Any] = {"concurrency": cfg.ray.prep_tasks} if cfg.ray.prep_tasks else {}
    return (
        ray.data.from_arrow(wave)
        .map_batches(functools.partial(_prepare, cfg, root, coordinator), batch_format="pyarrow", batch_size=None,
                     num_cpus=1, **prep_args)
        .map_batches(_Http, batch_format="pyarrow", batch_size=None, num_cpus=_HTTP_ACTOR_CPUS,
                     fn_constructor_kwargs={"cfg": cfg, "root": root, "endpoints": endpoints, "shares": shares,
                                            "coordinator": coordinator},
                     compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=in_flight,
                                                        max_concurrent_calls_per_actor=in_flight),
                     udf_modifying_row_count=True)  # Ray Data spreads actors over the nodes by default
    )


def _drive(driver: Driver, endpoints: list[EndpointConfig], limit: int | None, coordinator: Any,
           quit: threading.Event) -> None:
    """The driver's loop, in a thread: waves in, outcomes journalled as they stream back. Once
    the run is stopping no actor starts a request and no image is prepared, and what was in
    flight is still journalled, until the wave ends or `quit` is set."""
    cfg = driver.cfg
    root = driver.manifest.root
    for wave in _waves(driver, limit, cfg.ray.block_rows):
        seen: set[str] = set()  # a block Ray ran twice (after losing a node) comes back twice
        for batch in _pipeline(cfg, wave, root, endpoints, coordinator).iter_batches(
                batch_size=None, batch_format="pyarrow", prefetch_batches=4):
            outcomes = [outcome for outcome in map(pickle.loads, batch.column("outcome").to_pylist())
                        if outcome[0]["id"] not in seen]
            seen.update(row["id"] for row, _ in outcomes)
            driver.record(outcomes)
            if quit.is_set():
                return
        ray.get(coordinator.end_wave.remote())
        _, exhausted = ray.get(coordinator.spending.remote())
        if exhausted or driver.stopped():
            return


async def _watch(driver: Driver, coordinator: Any) -> None:
    """Tell every actor as soon as the run is stopping (a signal, or failures alike); until then,
    keep what holds the pace below the limits in the driver's view, for the progress bar and
    the summary (asked of the coordinator each second)."""
    held = ""
    driver.held = lambda: held
    asked = time.monotonic()
    while not driver.stopped():
        await asyncio.sleep(0.1)
        if time.monotonic() - asked >= HELD_EVERY_S:
            held = "; ".join(await asyncio.wrap_future(coordinator.held.remote().future()))
            asked = time.monotonic()
    await asyncio.wrap_future(coordinator.stop.remote().future())


async def run(driver: Driver, endpoints: list[EndpointConfig], schema: OutputSchema | None,
              limit: int | None) -> None:
    """The Ray engine (see the module's docstring); same arguments as the local engine, but
    `schema` stays on the driver (see _schema)."""
    cfg = driver.cfg
    _connect(cfg)  # in the main thread, where Ray can set its signal handlers
    here = ray.get_runtime_context().get_node_id()
    coordinator = CoordinatorActor.options(  # a node that leaves takes its actors with it: stay by the driver
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False), num_cpus=0,
        max_concurrency=10_000,
    ).remote(cfg.target_limits, driver.budget.limit_usd, driver.budget.spent_usd)
    quit = threading.Event()
    work = _in_daemon_thread(_drive, driver, endpoints, limit, coordinator, quit)
    watch = asyncio.create_task(_watch(driver, coordinator))
    try:
        with stopping_on_signals(driver):
            await asyncio.shield(work)
    except asyncio.CancelledError:
        quit.set()  # the thread stops at its next batch; what it records after the store closes is dropped
        ray.get(coordinator.stop.remote())
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(work), QUIT_WAIT_S)
        raise
    finally:
        watch.cancel()
        driver.budget.spent_usd, driver.budget.exhausted = ray.get(coordinator.spending.remote())
        ray.kill(coordinator)


def _in_daemon_thread(job: Callable[..., None], *args: Any) -> asyncio.Future[None]:
    """`job` in a daemon thread: one stuck waiting on Ray cannot keep the process from exiting
    (asyncio.to_thread's pool threads are waited for at exit)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def target() -> None:
        try:
            job(*args)
        except BaseException as error:  # handed to the awaiting coroutine, raised there
            loop.call_soon_threadsafe(settle, error)
        else:
            loop.call_soon_threadsafe(settle, None)

    threading.Thread(target=target, name="annotate-ray-driver", daemon=True).start()
    return done
