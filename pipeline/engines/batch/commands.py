"""`annotate batch status DIR` and `annotate batch cancel DIR`: an output directory's batches,
as the provider sees them now.

Owns: the config of the directory's last run (from its `_run.json`; the key from the variable
it names), reaching its endpoint, reading the ledger. Never: writing rows (a run collects them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...client import read_key
from ...config import EndpointConfig, RunConfig
from ...errors import RequestFailed, StoreError
from ...store.folder import local_dir_for, open_folder
from ...store.ledger import Ledger, Shard
from ...store.parts import read_run_info
from .api import BatchApi
from .engine import ENDED

__all__ = ["BatchLine", "cancel", "last_run_config", "status"]


@dataclass(frozen=True)
class BatchLine:
    """One batch of a directory, as a line of `annotate batch status`."""

    shard: str
    batch_id: str | None
    state: str  # the ledger's: planned, uploaded, created, collected
    status: str | None  # the provider's
    completed: int
    failed: int
    total: int
    age_s: float
    expires_in_s: float | None

    def __str__(self) -> str:
        expiry = "" if self.expires_in_s is None else f", expires in {self.expires_in_s / 3600:.1f} h"
        return (f"{self.batch_id or '(not created)'}  {self.status or self.state}: {self.completed} answered, "
                f"{self.failed} failed of {self.total or '?'}; {self.age_s / 3600:.1f} h old{expiry}  [{self.shard}]")


def last_run_config(directory: Path | str) -> RunConfig:
    """The config of the directory's last run, as its `_run.json` keeps it (header values and
    storage options are not kept: the environment gives them), to collect its batches with."""
    info = read_run_info(open_folder(directory))
    if info is None:
        raise StoreError(f"{directory}: no _run.json here (is it an output.dir?)")
    config = dict(info["config"])
    config["input"] = {**config["input"], "manifest": info["manifest"]["path"]}
    config["output"] = {**config["output"], "dir": str(directory)}
    for section in [config["endpoint"], *config.get("endpoints", [])]:
        section["headers"] = {}
    config["storage_options"] = {}
    cfg = RunConfig.model_validate(config)
    if cfg.endpoint.simulator is not None:
        raise StoreError(f"{directory}: its batches were sent to a simulator the run started, gone with it")
    return cfg


def _endpoint_and_ledger(directory: Path | str) -> tuple[EndpointConfig, Ledger]:
    cfg = last_run_config(directory)
    return cfg.targets[0], Ledger(local_dir_for(directory, cfg.output.journal_dir))


async def status(directory: Path | str) -> list[BatchLine]:
    """Every batch the directory's runs made, the open ones as the provider says now."""
    endpoint, ledger = _endpoint_and_ledger(directory)
    api = BatchApi(endpoint, read_key(endpoint), max_attempts=3)
    try:
        return [await _line(api, shard) for shard in ledger.shards()]
    finally:
        await api.aclose()
        ledger.close()


async def _line(api: BatchApi, shard: Shard) -> BatchLine:
    now = time.time()
    batch: dict[str, Any] = {}
    if shard.batch_id and shard.state != "collected":
        batch = await api.get(shard.batch_id)
    counts = batch.get("request_counts") or {}
    expires = batch.get("expires_at") or shard.expires_at
    return BatchLine(shard.name, shard.batch_id, shard.state, batch.get("status") or shard.status,
                     counts.get("completed", 0), counts.get("failed", 0), counts.get("total", shard.lines),
                     now - shard.planned_at, None if expires is None or shard.state == "collected" else expires - now)


async def cancel(directory: Path | str) -> list[str]:
    """Ask the provider to cancel every batch under way; their ids."""
    endpoint, ledger = _endpoint_and_ledger(directory)
    api = BatchApi(endpoint, read_key(endpoint), max_attempts=3)
    cancelled = []
    try:
        for shard in ledger.open_shards():
            if shard.batch_id and shard.status not in ENDED:
                try:
                    await api.cancel(shard.batch_id)
                except RequestFailed as exc:
                    if exc.status != 409:  # 409: it ended since the ledger last saw it
                        raise
                    continue
                cancelled.append(shard.batch_id)
    finally:
        await api.aclose()
        ledger.close()
    return cancelled
