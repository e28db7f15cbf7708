"""The output directory: journal, Parquet parts written whole or not at all, done ids, run
metadata, the one-writer lock.

Owns: file names, atomic writes, which ids are done, cutting parts from the journal, and
replacing an earlier error row when its id is answered again (the old row goes first, so
readers never see both). Never: deciding what a row holds. One writer (the runner) drives
it; every method blocks and is meant to run off the event loop.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import StoreError
from .journal import Journal
from .lock import Lock

__all__ = ["Store", "parts", "scan", "read_run_info", "RUN_FILE", "PARTS", "INTENT_FILE", "write_atomically", "hidden_copy", "part_stamp", "sync_dir", "finish_interrupted"]

RUN_FILE = "_run.json"
INTENT_FILE = "_compact.json"  # a compaction under way: which parts it replaces with which
PARTS = "part-*.parquet"
Row = dict[str, Any]


def sync_dir(directory: Path) -> None:
    """Make renames and removals in `directory` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def part_stamp() -> str:
    """What names a writer's parts: the time it started and a random tail, never an old name."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def hidden_copy(path: Path, write: Callable[[Path], Any]) -> Path:
    """`write` to a hidden name beside `path`, synced to disk; that name is returned."""
    tmp = path.with_name(f".{path.name}.tmp")  # hidden and not *.parquet: readers never see it half-written
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    return tmp


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    os.replace(hidden_copy(path, write), path)
    sync_dir(path.parent)  # before the journal lets go of the rows this file holds


def _without(part: Path, ids: set[str]) -> None:
    table = pq.read_table(part)
    kept = table.filter(pc.invert(pc.is_in(table["id"], value_set=pa.array(sorted(ids), pa.string()))))
    if kept.num_rows:
        write_atomically(part, lambda p: pq.write_table(kept, p))
    else:
        part.unlink()
        sync_dir(part.parent)


def finish_interrupted(directory: Path) -> None:
    """Complete a compaction whose new parts are all in place, or undo one whose are not."""
    intent_path = directory / INTENT_FILE
    if not intent_path.exists():
        return
    intent = json.loads(intent_path.read_text(encoding="utf-8"))
    new = [directory / name for name in intent["new"]]
    if all(p.exists() for p in new):
        doomed = [directory / name for name in intent["old"] if name not in intent["new"]]
    else:
        doomed = [*new, *(p.with_name(f".{p.name}.tmp") for p in new)]
    for path in doomed:
        path.unlink(missing_ok=True)
    intent_path.unlink()


def read_run_info(directory: Path) -> dict[str, Any] | None:
    """The directory's _run.json: its fingerprint, manifest, runs and config; None before a first run."""
    try:
        info: dict[str, Any] = json.loads((directory / RUN_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreError(f"output.dir: cannot read {directory / RUN_FILE}: {exc}") from None
    return info


def parts(directory: Path, required: bool = False) -> list[Path]:
    """The Parquet parts of an output directory, oldest first; `required`: at least one."""
    found = sorted(directory.glob(PARTS))
    if required and not found:
        raise StoreError(f"{directory}: no Parquet parts here (is it an output.dir?)")
    return found


def columns_of(files: list[Path]) -> dict[str, pl.DataType]:
    """Every column any of these parts has, from their footers."""
    columns: dict[str, pl.DataType] = {}
    for file in files:
        columns |= {name: kind for name, kind in pl.read_parquet_schema(file).items() if name not in columns}
    return columns


def scan(files: list[Path], columns: dict[str, pl.DataType] | None = None, **options: Any) -> pl.LazyFrame:
    """The rows of these parts as one frame, in every column any of them has (or `columns`): a
    part written by an older version, before a column was added, reads it as null."""
    return pl.scan_parquet(files, schema=columns or columns_of(files), missing_columns="insert", **options)


class Store:
    """Usage:
        store = Store(directory, schema)       # takes the lock, finishes what a crash left
        store.done                             # ids not to ask again
        store.record(rows); store.cut()        # journal a batch; now and then, a part
        store.close()                          # the last part, then the lock is released
    """

    def __init__(self, directory: Path, schema: pa.Schema, *, journal: bool = True,
                 retry_failed: bool = False) -> None:
        self.dir = directory
        self._schema = schema
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"output.dir: cannot create {directory}: {exc.strerror}") from None
        self._lock = Lock(directory)
        self._lock.acquire()
        finish_interrupted(directory)
        # time orders the parts of successive runs; the random tail keeps two runs in one second apart
        self._stamp = part_stamp()
        self._seq = 0
        self._busy = threading.RLock()
        self._journal = Journal(directory) if journal else None
        self._memory: list[Row] = []  # with the journal off: outcomes wait here for the next part
        self._errors = self._error_parts()
        if self._journal and (self._journal.open_cuts() or self._journal.pending()):
            with self._io("replay the journal"):
                self._recover()
        written = parts(directory)
        rows = scan(written) if written else pl.LazyFrame(schema={"id": pl.String, "status": pl.String,
                                                                          "retryable": pl.Boolean,
                                                                          "charged_usd": pl.Float64})
        final = pl.col("status") == "ok"
        if not retry_failed:
            final = final | pl.col("retryable").not_()
        # Only ids, and lazily: the runner's manifest query drops them in one pass, so a million
        # done rows never become a million Python strings.
        self.done: pl.LazyFrame = rows.filter(final).select("id")
        counts = self._read(rows.select(ok=(pl.col("status") == "ok").sum(), final=final.sum(),
                                        spent=pl.col("charged_usd").sum()))
        self.resumed = int(counts["ok"][0] or 0)
        self.spent_usd = float(counts["spent"][0] or 0.0)  # what earlier answers here were charged
        self.failed_for_good = int(counts["final"][0] or 0) - self.resumed  # earlier errors not asked again
        self.failed_ids = frozenset(self._errors)

    def _read(self, query: pl.LazyFrame) -> pl.DataFrame:
        try:
            return query.collect()
        except pl.exceptions.PolarsError as exc:
            raise StoreError(f"output.dir: cannot read the parts in {self.dir}: {exc}") from None

    def _error_parts(self) -> dict[str, Path]:
        """The part holding each error row already written."""
        written = parts(self.dir)
        if not written:
            return {}
        errors = self._read(scan(written, include_file_paths="file")
                            .filter(pl.col("status") != "ok").select("id", "file"))
        return {row_id: Path(file) for row_id, file in errors.iter_rows()}

    def _recover(self) -> None:
        """Finish cuts a crash interrupted, then make leftover journal rows a part."""
        assert self._journal is not None
        for part, upto in self._journal.open_cuts():
            if not (self.dir / part).exists():
                self._publish(self.dir / part, self._journal.rows(upto))
            self._journal.finish_cut(part, upto)
        self.cut()

    @contextmanager
    def _io(self, doing: str) -> Iterator[None]:
        """One store operation at a time (a cancelled caller's thread may still be in one),
        and a failing disk as one StoreError naming what failed."""
        with self._busy:
            try:
                yield
            except (sqlite3.Error, OSError, pa.ArrowException) as exc:
                raise StoreError(f"output.dir: cannot {doing} in {self.dir}: {exc}") from exc

    def record(self, rows: Sequence[Row]) -> None:
        """Outcomes on disk (one transaction) before they count as done."""
        with self._io("journal answers"):
            if self._journal:
                self._journal.append(rows)
            else:
                self._memory.extend(rows)

    def cut(self) -> None:
        """Everything recorded so far becomes one new part."""
        with self._io("write a part"):
            self._cut()

    def _cut(self) -> None:
        self._seq += 1
        path = self.dir / f"part-{self._stamp}-{self._seq:05d}.parquet"
        if self._journal is None:
            rows, self._memory = self._memory, []
            if rows:
                self._publish(path, rows)
            return
        if not self._journal.pending():
            return
        upto = self._journal.begin_cut(path.name)
        self._publish(path, self._journal.rows(upto))
        self._journal.finish_cut(path.name, upto)  # only after the rename: a crash before it redoes the cut

    def _publish(self, path: Path, rows: list[Row]) -> None:
        superseded: dict[Path, set[str]] = {}
        for row in rows:
            if (old := self._errors.pop(row["id"], None)) is not None:
                superseded.setdefault(Path(old), set()).add(row["id"])
        for part, ids in superseded.items():  # the old rows go first: readers never see both
            _without(part, ids)
        table = pa.Table.from_pylist(rows, schema=self._schema)
        write_atomically(path, lambda p: pq.write_table(table, p))
        self._errors.update((row["id"], path) for row in rows if row["status"] != "ok")

    def read_run_info(self) -> dict[str, Any] | None:
        return read_run_info(self.dir)

    def write_run_info(self, info: dict[str, Any]) -> None:
        text = json.dumps(info, indent=2, default=str)
        write_atomically(self.dir / RUN_FILE, lambda p: p.write_text(text, encoding="utf-8"))

    def close(self) -> None:
        """The last part, then the journal and the lock are let go."""
        with self._busy:
            try:
                self.cut()
            finally:
                if self._journal:
                    self._journal.close()
                self._lock.release()
