"""`annotate compact DIR`: many small parts into a few large ones, one row per id, in manifest order.

Owns: the rewrite and its intent file. New parts are written under hidden names, an intent
file lists the old and new parts, then the new ones are renamed into place and the old ones
removed. A crash in between is finished (or undone) by `store.finish_interrupted` when the
directory is next opened, so readers see the duplicates of an interrupted compaction only
until the next command runs on it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from .parts import (
    INTENT_FILE,
    Store,
    finish_interrupted,
    hidden_copy,
    part_stamp,
    parts,
    scan,
    sync_dir,
    write_atomically,
)

__all__ = ["compact", "Compacted"]

ROWS_PER_PART = 1_000_000


@dataclass(frozen=True)
class Compacted:
    rows: int
    parts_before: int
    parts_after: int
    in_manifest_order: bool


def compact(directory: Path, ids: Sequence[str] | None, rows_per_part: int = ROWS_PER_PART) -> Compacted:
    """Rewrite the parts, one row per id, in the order of `ids` (the manifest's) when given."""
    store = Store(directory, pq.read_schema(parts(directory, required=True)[0]))  # the lock, and a leftover journal made a part
    try:
        return _rewrite(directory, ids, rows_per_part)
    finally:
        store.close()


def _rewrite(directory: Path, ids: Sequence[str] | None, rows_per_part: int) -> Compacted:
    old = parts(directory)
    rows = scan(old).unique(subset="id", keep="last", maintain_order=True)
    if ids is not None:
        order = pl.LazyFrame({"id": ids, "_order": range(len(ids))}, schema={"id": pl.String, "_order": pl.Int64})
        rows = rows.join(order, on="id", how="left").sort("_order", nulls_last=True, maintain_order=True).drop("_order")
    table = rows.collect().to_arrow()
    stamp = part_stamp()
    new = [directory / f"part-{stamp}-compact-{i:05d}.parquet"
           for i in range(max(1, -(-table.num_rows // rows_per_part)))]
    hidden = [hidden_copy(path, functools.partial(pq.write_table, table.slice(i * rows_per_part, rows_per_part)))
              for i, path in enumerate(new)]
    intent = {"old": [p.name for p in old], "new": [p.name for p in new]}
    write_atomically(directory / INTENT_FILE, lambda p: p.write_text(json.dumps(intent), encoding="utf-8"))
    for tmp, path in zip(hidden, new):
        tmp.rename(path)
    sync_dir(directory)
    finish_interrupted(directory)
    return Compacted(table.num_rows, len(old), len(new), ids is not None)
