"""The output directory: journal, Parquet parts written whole or not at all, done ids, run
metadata, the one-writer lock; on local disk or in a bucket.

Owns: file names, which ids are done, cutting parts from the journal, and replacing an
earlier error row when its id is answered again (the old row goes first, so readers never see
both). Never: deciding what a row holds, or how a file is published (folder.py). One writer
(the runner) drives it; every method blocks and is meant to run off the event loop. With the
output in a bucket, the journal and the lock stay on local disk and the bucket holds a lease.
"""

from __future__ import annotations

import io
import json
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
from .columns import COLUMNS
from .folder import BucketFolder, Folder, journal_owner, local_dir_for, open_folder
from .journal import Journal
from .lease import Lease
from .lock import Lock

__all__ = ["Store", "parts", "scan", "columns_of", "read_run_info", "RUN_FILE", "PARTS", "INTENT_FILE",
           "part_stamp", "finish_interrupted"]

RUN_FILE = "_run.json"
INTENT_FILE = "_compact.json"  # a compaction under way: which parts it replaces with which
PARTS = "part-*.parquet"
Row = dict[str, Any]
_OUTPUT = pl.DataFrame(COLUMNS.empty_table()).schema
Redo = Callable[[pl.LazyFrame], pl.LazyFrame]  # the ids of answered rows to ask again, from all rows


def part_stamp() -> str:
    """What names a writer's parts: the time it started and a random tail, never an old name."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _name(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1]


def _without(folder: Folder, name: str, ids: set[str]) -> None:
    table = pq.read_table(io.BytesIO(folder.read(name)))
    kept = table.filter(pc.invert(pc.is_in(table["id"], value_set=pa.array(sorted(ids), pa.string()))))
    if kept.num_rows:
        folder.publish(name, lambda p: pq.write_table(kept, p))
    else:
        folder.remove(name)


def finish_interrupted(folder: Folder) -> None:
    """Complete a compaction whose new parts are all in place, or undo one whose are not."""
    try:
        intent = json.loads(folder.read(INTENT_FILE))
    except FileNotFoundError:
        return
    if all(folder.exists(name) for name in intent["new"]):
        doomed = [name for name in intent["old"] if name not in intent["new"]]
    else:
        doomed = [*intent["new"], *(f".{name}.tmp" for name in intent["new"])]
    for name in doomed:
        folder.remove(name)
    folder.remove(INTENT_FILE)


def read_run_info(folder: Folder) -> dict[str, Any] | None:
    """The directory's _run.json: its fingerprint, manifest, runs and config; None before a first run."""
    try:
        info: dict[str, Any] = json.loads(folder.read(RUN_FILE))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreError(f"output.dir: cannot read {folder.locate(RUN_FILE)}: {exc}") from None
    return info


def parts(folder: Folder, required: bool = False) -> list[str]:
    """The Parquet parts of an output directory, oldest first, as Polars reads them; `required`: at least one."""
    try:
        found = [folder.locate(name) for name in folder.names(PARTS)]
    except OSError as exc:
        raise StoreError(f"{folder.label}: cannot list the parts: {exc}") from None
    if required and not found:
        raise StoreError(f"{folder.label}: no Parquet parts here (is it an output.dir?)")
    return found


def columns_of(files: list[str], options: dict[str, str] | None = None) -> dict[str, pl.DataType]:
    """Every column any of these parts has, from their footers, and every output column this
    version writes (parts written before one was added read it as null)."""
    columns: dict[str, pl.DataType] = {}
    for file in files:
        schema = pl.scan_parquet(file, storage_options=options).collect_schema()
        columns |= {name: kind for name, kind in schema.items() if name not in columns}
    return columns | {name: kind for name, kind in _OUTPUT.items() if name not in columns}


def scan(files: list[str], columns: dict[str, pl.DataType] | None = None, options: dict[str, str] | None = None,
         **kwargs: Any) -> pl.LazyFrame:
    """The rows of these parts as one frame, in every column any of them has (or `columns`): a
    part written by an older version, before a column was added, reads it as null."""
    return pl.scan_parquet(files, schema=columns or columns_of(files, options), missing_columns="insert",
                           storage_options=options, **kwargs)


class Store:
    """Usage:
        store = Store(location, schema)        # takes the lock, finishes what a crash left
        store.done                             # ids not to ask again
        store.record(rows); store.cut()        # journal a batch; now and then, a part
        store.close()                          # the last part, then the lock is released
    """

    def __init__(self, location: Path | str, schema: pa.Schema, *, journal: bool = True,
                 retry_failed: bool = False, redo: Redo | None = None, journal_dir: Path | None = None) -> None:
        # the journal, the lock and files on their way to a bucket: on local disk
        self.local = local_dir_for(location, journal_dir)
        self._schema = schema
        try:
            self.local.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"output.dir: cannot create {self.local}: {exc.strerror}") from None
        self._busy = threading.RLock()
        self._lock = Lock(self.local, str(location))
        self._lock.acquire()
        self._lease: Lease | None = None
        try:
            self.folder = open_folder(location, self.local)
            if isinstance(self.folder, BucketFolder):
                self._lease = Lease(self.folder.bucket, journal_owner(self.local, self.folder.label))
                self._lease.acquire()
            self._open(journal, retry_failed, redo)
        except BaseException:
            self._let_go()
            raise

    def _open(self, journal: bool, retry_failed: bool, redo: Redo | None) -> None:
        with self._io("open the output"):
            finish_interrupted(self.folder)
        # time orders the parts of successive runs; the random tail keeps two runs in one second apart
        self._stamp = part_stamp()
        self._seq = 0
        self._journal = Journal(self.local) if journal else None
        self._memory: list[Row] = []  # with the journal off: outcomes wait here for the next part
        self._errors: dict[str, str] = {}  # the part holding each row a new answer replaces, by id
        if self._journal and (self._journal.open_cuts() or self._journal.pending()):
            with self._io("replay the journal"):
                self._recover()
        self._read_done(retry_failed, redo)

    def _read_done(self, retry_failed: bool, redo: Redo | None) -> None:
        """From the parts: the ids not to ask again, the rows a new answer replaces (and what
        they cost), and the counts the summary starts from."""
        written = parts(self.folder)
        rows = self._scan(written) if written else pl.LazyFrame(schema=_OUTPUT)
        # answered rows asked again (--retry-flagged): this run asks only these
        redo_ids = None if redo is None else self._read(redo(rows))["id"]
        replaceable = self._replaceable(written, redo_ids)
        self.failed_ids = frozenset(row_id for row_id, (_, ok, _) in replaceable.items() if not ok)
        self.redo_ids = frozenset(row_id for row_id, (_, ok, _) in replaceable.items() if ok)
        self.redo = None if redo is None else pl.LazyFrame({"id": sorted(self.redo_ids)}, schema={"id": pl.String})
        self._errors = {row_id: part for row_id, (part, _, _) in replaceable.items()}
        # what the rows that may be replaced had cost: the new row keeps it (earlier_cost_usd)
        self.paid_before = {row_id: paid for row_id, (_, _, paid) in replaceable.items() if paid != (None, None)}
        final = pl.col("status") == "ok"
        if not retry_failed:
            final = final | pl.col("retryable").not_()
        # Only ids, and lazily: the runner's manifest query drops them in one pass, so a million
        # done rows never become a million Python strings.
        self.done: pl.LazyFrame = rows.filter(final).select("id")
        if self.redo is not None:
            self.done = self.done.join(self.redo, on="id", how="anti")
        counts = self._read(rows.select(ok=(pl.col("status") == "ok").sum(), final=final.sum(),
                                        errors=(pl.col("status") != "ok").sum(), spent=pl.col("charged_usd").sum()))
        self.resumed = int(counts["ok"][0] or 0)
        self.spent_usd = float(counts["spent"][0] or 0.0)  # what earlier answers here were charged
        # earlier errors not asked again: with redo, none is
        self.failed_for_good = int((counts["errors"] if redo else counts["final"] - counts["ok"])[0] or 0)

    def row(self, row_id: str) -> Row | None:
        """The row a new answer may replace (an error, or an answer asked again), as written."""
        part = self._errors.get(row_id)
        if part is None:
            return None
        with self._io("read a row"):
            found = self._read(self._scan([self.folder.locate(part)]).filter(pl.col("id") == row_id))
        return found.row(0, named=True) if found.height else None

    def _scan(self, files: list[str], **kwargs: Any) -> pl.LazyFrame:
        return scan(files, options=self.folder.options, **kwargs)

    def _read(self, query: pl.LazyFrame) -> pl.DataFrame:
        try:
            return query.collect()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise StoreError(f"output.dir: cannot read the parts in {self.folder.label}: {exc}") from None

    def _replaceable(self, written: list[str], also: pl.Series | None = None
                     ) -> dict[str, tuple[str, bool, tuple[float | None, float | None]]]:
        """The rows a new answer may replace (errors, and the answered rows whose ids are in
        `also`): the part holding each, whether it was answered, and its (cost_usd, charged_usd)."""
        if not written:
            return {}
        rows = self._scan(written, include_file_paths="file")
        chosen = pl.col("status") != "ok"
        if also is not None:
            chosen = chosen | pl.col("id").is_in(also.implode())
        found = self._read(rows.filter(chosen).select("id", "file", pl.col("status") == "ok", "cost_usd",
                                                      "charged_usd"))
        return {row_id: (_name(file), ok, (cost, charged)) for row_id, file, ok, cost, charged in found.iter_rows()}

    def _recover(self) -> None:
        """Finish cuts a crash interrupted, then make leftover journal rows a part."""
        assert self._journal is not None
        for part, upto in self._journal.open_cuts():
            if not self.folder.exists(part):
                self._publish(part, self._newer(self._journal.rows(upto)))
            self._journal.finish_cut(part, upto)
        if self._journal.pending():
            self._cut(self._newer)

    def _newer(self, rows: list[Row]) -> list[Row]:
        """The journal's rows less those answered later by a run elsewhere (with the output in a
        bucket, another machine may have resumed it while this journal waited); the rows they
        replace (errors, answers asked again) are known as replaceable from here on."""
        written = parts(self.folder)
        if not written or not rows:
            return rows
        ids = pl.Series([row["id"] for row in rows], dtype=pl.String)
        found = self._read(self._scan(written).filter(pl.col("id").is_in(ids.implode()))
                           .select("id", "status", "finished_at"))
        answered = {row_id: at for row_id, status, at in found.iter_rows() if status == "ok"}
        # a journal's answer replaces an older answer in a part (asked again); it gives way to a
        # newer one, and a journal's error never replaces an answer
        kept = [row for row in rows if row["id"] not in answered or (
            row["status"] == "ok" and (at := answered[row["id"]]) is not None and at < row["finished_at"])]
        replaced = self._replaceable(written, pl.Series([row["id"] for row in kept], dtype=pl.String))
        self._errors.update((row_id, part) for row_id, (part, _, _) in replaced.items())
        return kept

    @contextmanager
    def _io(self, doing: str) -> Iterator[None]:
        """One store operation at a time (a cancelled caller's thread may still be in one),
        and a failing disk or bucket as one StoreError naming what failed."""
        with self._busy:
            try:
                yield
            except (sqlite3.Error, OSError, pa.ArrowException) as exc:
                raise StoreError(f"output.dir: cannot {doing} in {self.folder.label}: {exc}") from exc

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

    def guard(self) -> None:
        """StoreError once this run may not write the output any more (a bucket's lease lost)."""
        if self._lease:
            self._lease.check()

    def _cut(self, keep: Callable[[list[Row]], list[Row]] | None = None) -> None:
        self.guard()  # also when there is nothing to write: the run learns it should stop
        self._seq += 1
        name = f"part-{self._stamp}-{self._seq:05d}.parquet"
        if self._journal is None:
            rows, self._memory = self._memory, []
            if rows:
                self._publish(name, rows)
            return
        if not self._journal.pending():
            return
        upto = self._journal.begin_cut(name)
        rows = self._journal.rows(upto)
        self._publish(name, keep(rows) if keep else rows)
        self._journal.finish_cut(name, upto)  # only once the part is in place: a crash before it redoes the cut

    def _publish(self, name: str, rows: list[Row]) -> None:
        self.guard()
        if not rows:
            return
        superseded: dict[str, set[str]] = {}
        for row in rows:
            if (old := self._errors.pop(row["id"], None)) is not None:
                superseded.setdefault(old, set()).add(row["id"])
        for part, ids in superseded.items():  # the old rows go first: readers never see both
            _without(self.folder, part, ids)
        table = pa.Table.from_pylist(rows, schema=self._schema)
        self.folder.publish(name, lambda p: pq.write_table(table, p))
        self._errors.update((row["id"], name) for row in rows if row["status"] != "ok")

    def read_run_info(self) -> dict[str, Any] | None:
        return read_run_info(self.folder)

    def write_run_info(self, info: dict[str, Any]) -> None:
        text = json.dumps(info, indent=2, default=str)
        with self._io("write _run.json"):
            self.guard()
            self.folder.publish(RUN_FILE, lambda p: p.write_text(text, encoding="utf-8"))

    def _let_go(self) -> None:
        try:
            if self._lease:
                self._lease.release()
        finally:
            self._lock.release()

    def close(self) -> None:
        """The last part, then the journal and the locks are let go."""
        with self._busy:
            try:
                self.cut()
            finally:
                if self._journal:
                    self._journal.close()
                self._let_go()
