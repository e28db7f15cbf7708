"""`annotate compact DIR`: many small parts into a few large ones, one row per id, in manifest order.

Owns: the rewrite and its intent file. New parts are written under hidden names, an intent
file lists the old and new parts, then the new ones are renamed into place and the old ones
removed. A crash in between is finished (or undone) by `store.finish_interrupted` when the
directory is next opened, so readers see the duplicates of an interrupted compaction only
until the next command runs on it.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from ..config import InputConfig, PromptConfig
from ..errors import ManifestError
from ..manifest import Manifest
from .parts import INTENT_FILE, RUN_FILE, Store, finish_interrupted, parts, scan, sync_dir, write_atomically

__all__ = ["compact", "Compacted"]

ROWS_PER_PART = 1_000_000


@dataclass(frozen=True)
class Compacted:
    rows: int
    parts_before: int
    parts_after: int
    in_manifest_order: bool


def _manifest_order(directory: Path) -> pl.LazyFrame | None:
    """Each id's position in the manifest the last run read, or None when it cannot be read."""
    try:
        info = json.loads((directory / RUN_FILE).read_text(encoding="utf-8"))
        source = InputConfig.model_validate(info["config"]["input"] | {"manifest": info["manifest"]["path"]})
        manifest = Manifest(source, PromptConfig.model_validate(info["config"]["prompt"]))
    except (OSError, ValueError, KeyError, ManifestError):
        return None
    ids = [row.id for batch in manifest.batches() for row in batch]
    return pl.LazyFrame({"id": ids, "_order": range(len(ids))}, schema={"id": pl.String, "_order": pl.Int64})


def compact(directory: Path, rows_per_part: int = ROWS_PER_PART) -> Compacted:
    store = Store(directory, pq.read_schema(parts(directory, required=True)[0]))  # the lock, and a leftover journal made a part
    try:
        return _rewrite(directory, rows_per_part)
    finally:
        store.close()


def _rewrite(directory: Path, rows_per_part: int) -> Compacted:
    old = parts(directory)
    rows = scan(old).unique(subset="id", keep="last", maintain_order=True)
    order = _manifest_order(directory)
    if order is not None:
        rows = rows.join(order, on="id", how="left").sort("_order", nulls_last=True, maintain_order=True).drop("_order")
    table = rows.collect().to_arrow()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]  # never an old name
    new = [directory / f"part-{stamp}-compact-{i:05d}.parquet"
           for i in range(max(1, -(-table.num_rows // rows_per_part)))]
    for i, path in enumerate(new):
        chunk = table.slice(i * rows_per_part, rows_per_part)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(chunk, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    intent = {"old": [p.name for p in old], "new": [p.name for p in new]}
    write_atomically(directory / INTENT_FILE, lambda p: p.write_text(json.dumps(intent), encoding="utf-8"))
    for path in new:
        path.with_name(f".{path.name}.tmp").rename(path)
    sync_dir(directory)
    finish_interrupted(directory)
    return Compacted(table.num_rows, len(old), len(new), order is not None)
