"""Run, or resume, one job: check the config and the output directory, open the store, and
hand the rows to the engine the config names (`pipeline.engines`).

Owns: what is checked before anything is sent, `_run.json`, the progress bar's life and the
summary's last figures. Never: how an engine sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from . import objects, quality
from .client import read_key
from .config import EndpointConfig, RunConfig, fingerprint, fingerprint_changes
from .cost.pricing import PriceTable
from .engines import batch, local
from .engines.driver import Driver, Summary
from .errors import ConfigError, Interrupted, RunStopped, StoreError
from .manifest import Manifest
from .store import columns
from .store.parts import Store
from .structured import OutputSchema, build_schema

__all__ = ["Summary", "new_event_loop", "run"]

new_event_loop: Callable[[], asyncio.AbstractEventLoop]
try:  # uvloop takes about a tenth less CPU per request than asyncio's own loop
    from uvloop import new_event_loop
except ImportError:  # Windows, where uvloop does not install
    new_event_loop = asyncio.new_event_loop

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _endpoint(cfg: EndpointConfig) -> Iterator[EndpointConfig]:
    """The endpoint to talk to: the configured one, or the bundled simulator it asks for."""
    if cfg.simulator is None:
        yield cfg
        return
    from .simulator import (
        server as simulator,  # the server's libraries load only when a config asks for it
    )

    with simulator.running(cfg.simulator) as sim:
        yield cfg.model_copy(update={"base_url": sim.url})


@contextlib.contextmanager
def _endpoints(targets: Sequence[EndpointConfig]) -> Iterator[list[EndpointConfig]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(_endpoint(target)) for target in targets]


def _claim_directory(store: Store, cfg: RunConfig, total: int, force: bool, retry_flagged: bool) -> None:
    """Refuse to mix answers of two different configs in one directory, unless forced; then
    record this run (fingerprint, manifest, config without header values) in `_run.json`."""
    now = fingerprint(cfg)
    before = store.read_run_info()
    if before and not force and (changed := fingerprint_changes(before.get("fingerprint", {}), now)):
        raise StoreError(f"output.dir: {cfg.output.dir} holds answers to another config ({'; '.join(changed)}); "
                         "use another output dir, or --force to mix them on purpose")
    runs = (before or {}).get("runs", [])
    config = cfg.model_dump(mode="json")
    for section in [config["endpoint"], *config["endpoints"]]:
        section["headers"] = sorted(section["headers"])  # names only: values may be private
    config["storage_options"] = sorted(config["storage_options"])  # names only, as headers
    manifest = cfg.input.manifest
    store.write_run_info({
        "fingerprint": now,
        "manifest": {"path": str(manifest.resolve() if isinstance(manifest, Path) else manifest), "rows": total},
        "runs": [*runs, {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "forced": force,
                         **({"retry_flagged": cfg.quality.retry} if retry_flagged else {})}],
        "config": config,
    })


def _open_store(cfg: RunConfig, columns: pa.Schema, total: int, retry_failed: bool, retry_flagged: bool,
                force: bool) -> Store:
    prose = cfg.output_schema is None
    redo = functools.partial(quality.flagged_ids, quality=cfg.quality, prose=prose) if retry_flagged else None
    store = Store(cfg.output.dir, columns, journal=cfg.output.journal, retry_failed=retry_failed, redo=redo,
                  journal_dir=cfg.output.journal_dir)
    try:
        _claim_directory(store, cfg, total, force, retry_flagged)
    except BaseException:
        store.close()
        raise
    return store


async def run(cfg: RunConfig, *, limit: int | None = None, progress: bool = True, retry_failed: bool = False,
              retry_flagged: bool = False, force: bool = False) -> Summary:
    """Run, or resume, one job on the engine the config names. Raises ConfigError,
    ManifestError or StoreError before sending anything, RunStopped when every request fails
    alike, Interrupted on SIGINT or SIGTERM. `retry_flagged`: ask only the answered rows that
    carry a flag again, with quality.retry over the request."""
    started = time.monotonic()
    asked = _retrying(cfg, retry_failed) if retry_flagged else cfg  # how requests are made this time
    prices = PriceTable(cfg.pricing)
    if cfg.limits.max_cost_usd is not None and prices.find(cfg.request.model) is None:
        raise ConfigError(f"limits.max_cost_usd: no price is known for {cfg.request.model}, so a budget cannot "
                          "be kept; add the model under pricing:")
    if cfg.limits.max_cost_usd is not None and asked.request.max_tokens is None:
        raise ConfigError("limits.max_cost_usd: a budget needs request.max_tokens, the cap on what an answer costs")
    for target in cfg.targets:
        read_key(target)  # an unset key is exit 2 here, before anything is sent
    _check_buckets(cfg)
    engine = _engine(cfg)
    manifest = Manifest(cfg.input, cfg.prompt)
    schema = build_schema(cfg.output_schema, cfg.request.structured)
    if schema is not None and schema.not_strict:
        log.warning("output_schema is asked for with strict: false (%s): the provider may answer outside it, "
                    "and such answers are asked again", schema.not_strict)
    output = columns.schema(manifest.keep_schema, schema.fields if schema else ())  # a clashing field: exit 2 now
    total = await asyncio.to_thread(manifest.count)
    with _endpoints(cfg.targets) as endpoints:
        store = await asyncio.to_thread(_open_store, cfg, output, total, retry_failed, retry_flagged, force)
        summary = Summary(output_dir=cfg.output.dir, total=total, resumed=store.resumed - len(store.redo_ids),
                          failed_before=store.failed_for_good)
        if prices.find(cfg.request.model) is None:
            log.warning("no price known for %s: cost_usd stays empty (add it under pricing:)", cfg.request.model)
        done_before = summary.resumed + summary.failed_before
        todo = total if store.redo is None else done_before + len(store.redo_ids)
        todo = todo if limit is None else min(todo, done_before + limit)
        with tqdm(total=todo, initial=done_before, unit="row", disable=not progress, dynamic_ncols=True) as bar:
            driver = Driver(asked, manifest, store, bar, summary)
            try:
                await engine(driver, endpoints, schema, limit)
            except asyncio.CancelledError:
                driver.signalled = True
            finally:
                driver.close()
    summary.elapsed_s = time.monotonic() - started
    summary.budget_usd, summary.spent_usd = cfg.limits.max_cost_usd, driver.budget.spent_usd
    summary.stopped_at_budget = driver.budget.exhausted
    if driver.signalled:
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
        return local.run
    if cfg.engine == "batch":
        _check_batch(cfg)
        return batch.run
    try:
        # the only package that imports ray, an optional extra
        from .engines.ray import run as on_ray
    except ImportError as exc:
        raise ConfigError(f"engine: ray needs Ray ({exc}); pip install 'annotate-pipeline[ray]'") from None
    return on_ray


def _retrying(cfg: RunConfig, retry_failed: bool) -> RunConfig:
    """The config flagged rows are asked again with (--retry-flagged)."""
    if retry_failed:
        raise ConfigError("--retry-flagged, --retry-failed: ask one kind of row again at a time; run them one "
                          "after the other")
    if cfg.engine == "batch":
        raise ConfigError("--retry-flagged: engine batch collects its batches in later runs, which would not "
                          "know the rows were asked again; use --engine local (flagged rows are few)")
    return cfg.retried()


def _check_buckets(cfg: RunConfig) -> None:
    """The extra each bucket URL of the config needs (exit 2 naming it), and the storage options."""
    objects.use_options(cfg.storage_options)
    for url in (cfg.input.manifest, cfg.input.image_root, cfg.output.dir):
        if isinstance(url, str):
            objects.check_extra(url)


def _check_batch(cfg: RunConfig) -> None:
    """What engine: batch needs before anything is sent."""
    if len(cfg.targets) > 1:
        raise ConfigError("endpoints: engine: batch sends through one endpoint; name it under endpoint:")
    if not cfg.output.journal:
        raise ConfigError("output.journal: engine: batch keeps its batches in the journal; leave it on")
    if cfg.limits.max_cost_usd is not None and PriceTable(cfg.pricing).list_usd(cfg.request.model, 1, 1, batch=True) is None:
        raise ConfigError(f"limits.max_cost_usd: no batch price is known for {cfg.request.model}, so a budget cannot "
                          "be kept; add batch_input and batch_output under pricing:")
