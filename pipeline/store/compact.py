"""`annotate compact DIR`: many small parts into a few large ones, one row per id, in manifest order.

Owns: the rewrite and its intent file. New parts are written under hidden names, an intent
file lists the old and new parts, then the new ones are put in place (renamed, or uploaded to
a bucket) and the old ones removed. A crash in between is finished (or undone) by `store.finish_interrupted` when the
directory is next opened, so readers see the duplicates of an interrupted compaction only
until the next command runs on it.

Memory holds the ids (tens of bytes a row) and PILE_ROWS rows, never the whole dataset: a first
pass over the ids alone decides where each kept row goes; a second reads the old parts
PILE_ROWS rows at a time and deals them into piles of PILE_ROWS rows of the new order; each new
part is then written pile by pile, each pile put in order on its own.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from .folder import hidden_copy, open_folder
from .parts import INTENT_FILE, PARTS, Store, columns_of, finish_interrupted, part_stamp, parts, scan

__all__ = ["compact", "Compacted"]

ROWS_PER_PART = 1_000_000
PILE_ROWS = 100_000  # rows read, sorted and written at a time; also the new parts' row groups
PILES = ".compact-piles-"  # a hidden folder of piles, removed when the rewrite ends


@dataclass(frozen=True)
class Compacted:
    rows: int
    parts_before: int
    parts_after: int
    in_manifest_order: bool


def compact(directory: Path | str, ids: pl.Series | None, rows_per_part: int = ROWS_PER_PART,
            journal_dir: Path | None = None) -> Compacted:
    """Rewrite the parts, one row per id, in the order of `ids` (the manifest's) when given;
    `journal_dir`: where a bucket output's runs keep their journal (output.journal_dir)."""
    folder = open_folder(directory)
    names = folder.names(PARTS)
    if not names:
        parts(folder, required=True)  # the error saying so
    schema = pq.read_schema(io.BytesIO(folder.read(names[0])))  # of a part (5,000 rows): read whole on a bucket
    store = Store(directory, schema, journal_dir=journal_dir)  # the lock, and a leftover journal made a part
    try:
        return _rewrite(store, ids, rows_per_part)
    finally:
        store.close()


def _rewrite(store: Store, ids: pl.Series | None, rows_per_part: int) -> Compacted:
    """Piles and new parts are written in the store's local folder before they go in place."""
    folder, local = store.folder, store.local
    for leftover in local.glob(f"{PILES}*"):  # from a compaction killed while dealing
        shutil.rmtree(leftover)
    for leftover in local.glob(".part-*.parquet.tmp"):  # new parts of one killed before they went up
        leftover.unlink()
    names = folder.names(PARTS)
    old = _Old([folder.locate(name) for name in names], folder.options)
    per_part = -(-rows_per_part // PILE_ROWS)  # piles in a whole new part
    plan = _plan(old, ids, rows_per_part, per_part)
    stamp = part_stamp()
    piles_at = local / f"{PILES}{stamp}"
    piles_at.mkdir()
    try:
        piles = _deal(old, plan, piles_at)
        new = [f"part-{stamp}-compact-{i:05d}.parquet" for i in range(max(1, -(-plan.height // rows_per_part)))]
        hidden = [hidden_copy(local / name, functools.partial(_write_in_order, piles[i * per_part:(i + 1) * per_part],
                                                              old))
                  for i, name in enumerate(new)]
    finally:
        shutil.rmtree(piles_at)
    store.guard()
    intent = {"old": names, "new": new}
    folder.publish(INTENT_FILE, lambda p: p.write_text(json.dumps(intent), encoding="utf-8"))
    for tmp, name in zip(hidden, new):
        store.guard()
        folder.put_file(name, tmp)
    store.guard()
    finish_interrupted(folder)
    return Compacted(plan.height, len(names), len(new), ids is not None)


@dataclass(frozen=True)
class _Old:
    """The parts being replaced, and what Polars needs to read them."""

    files: list[str]
    options: dict[str, str] | None

    def scan(self, files: list[str] | None = None, columns: dict[str, pl.DataType] | None = None) -> pl.LazyFrame:
        return scan(self.files if files is None else files, columns, self.options)


def _plan(old: _Old, ids: pl.Series | None, rows_per_part: int, per_part: int) -> pl.DataFrame:
    """Each kept row's place in the old parts read one after another (`_at`: an id's last row
    wins), its place in the new order (`_to`) and its pile (`_pile`: per_part to a new part);
    ordered by `_at`."""
    kept = old.scan().select("id").with_row_index("_at").unique(subset="id", keep="last")
    if ids is not None:  # the manifest's order; ids it no longer has go last, as they were
        order = ids.rename("id").to_frame().with_row_index("_order").lazy()
        kept = kept.join(order, on="id", how="left").sort("_order", "_at", nulls_last=True)
    else:
        kept = kept.sort("_at")
    to = pl.int_range(pl.len(), dtype=pl.UInt64)
    pile = to // rows_per_part * per_part + to % rows_per_part // PILE_ROWS
    return kept.select("_at", to.alias("_to"), pile.alias("_pile")).sort("_at").collect(engine="streaming")


def _deal(old: _Old, plan: pl.DataFrame, folder: Path) -> list[Path]:
    """The kept rows of the old parts, appended to their piles; the piles' files, by number."""
    columns = columns_of(old.files, old.options)
    writers: dict[int, pq.ParquetWriter] = {}
    at = 0
    try:
        for part in old.files:
            for start in range(0, old.scan([part], columns).select(pl.len()).collect().item(), PILE_ROWS):
                rows = old.scan([part], columns).slice(start, PILE_ROWS).collect().with_row_index("_at", offset=at)
                lo, hi = (plan["_at"].search_sorted(at + skip) for skip in (0, rows.height))
                at += rows.height
                for (pile,), share in rows.join(plan[lo:hi], on="_at").partition_by("_pile", as_dict=True).items():
                    table = share.drop("_at", "_pile").to_arrow()
                    if pile not in writers:
                        writers[pile] = pq.ParquetWriter(folder / f"{pile:05d}.parquet", table.schema)
                    writers[pile].write_table(table)
    finally:
        for writer in writers.values():
            writer.close()
    return [folder / f"{pile:05d}.parquet" for pile in sorted(writers)]  # 0, 1, ...: `_to` has no gaps


def _write_in_order(piles: list[Path], old: _Old, path: Path) -> None:
    """A new part at `path`: its piles one after another, each put in order on its own (with no
    piles, no rows in the old parts' columns)."""
    if not piles:
        pq.write_table(old.scan().head(0).collect().to_arrow(), path)
        return
    tables = (pl.read_parquet(pile).sort("_to").drop("_to").to_arrow() for pile in piles)
    first = next(tables)
    with pq.ParquetWriter(path, first.schema) as writer:
        for table in itertools.chain([first], tables):
            writer.write_table(table, row_group_size=PILE_ROWS)
