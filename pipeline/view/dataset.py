"""The rows `annotate view` shows: a page of an output directory's rows by filter and sort, one
row whole, the run's summary and the values there are to filter by.

Owns: the queries (Polars over the Parquet parts). The parts are listed again on every call,
so a directory a run is still writing shows each part once it is published. A page is found
from the filter and sort columns of every part, then its rows are read whole from only the
parts that hold them. Never: images (pictures.py) or HTTP (app.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import polars as pl

from .. import quality, report
from ..config import QualityConfig
from ..errors import StoreError
from ..store.folder import open_folder
from ..store.parts import columns_of, parts, read_run_info, scan
from ..structured import categories

__all__ = ["Query", "Output", "SORTS", "PAGE_MAX"]

SORTS = {"cost": "cost_usd", "latency": "latency_ms", "tokens": "total_tokens"}
PAGE_MAX = 200
TRIES = 3  # readings of parts that keep changing under them
SUMMARY_TTL_S = 10.0  # the summary is read again at most this often while the parts stay the same
T = TypeVar("T")


@dataclass(frozen=True)
class Query:
    """Which rows, in which order. Empty strings mean 'any'."""

    status: str = ""
    error: str = ""  # the error's kind: its text before the first ':' (request, image, parse_error, ...)
    finish: str = ""  # finish_reason
    flag: str = ""  # a flag of quality.flags_of (empty, length, refusal, short), or quality.DUPLICATE
    label: str = ""  # "field=value" for an enum or boolean field of the output schema ("a.b=x" nested)
    text: str = ""  # in the answer, any case
    sort: str = ""  # a key of SORTS, '-' before it for the largest first; '' for the order rows were written
    offset: int = 0
    limit: int = 48


def _label_column(path: str) -> pl.Expr:
    first, *rest = path.split(".")
    column = pl.col(first)
    for name in rest:
        column = column.struct.field(name)
    return column


def _shown(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


class Output:
    """An output directory (local or in a bucket) as the viewer reads it."""

    def __init__(self, location: Path | str) -> None:
        self.location = location
        self.folder = open_folder(location)
        self._columns: tuple[tuple[str, ...], dict[str, pl.DataType]] = ((), {})
        self._summary: tuple[tuple[str, ...], float, dict[str, Any]] = ((), 0.0, {})

    def info(self) -> dict[str, Any]:
        return read_run_info(self.folder) or {}

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = self.info().get("config") or {}
        return config

    def _files(self) -> list[str]:
        return parts(self.folder)

    def _schema(self, files: list[str]) -> dict[str, pl.DataType]:
        """Every column of these parts (their footers are read once per set of parts)."""
        if tuple(files) != self._columns[0]:
            self._columns = (tuple(files), columns_of(files, self.folder.options))
        return self._columns[1]

    def _frame(self, files: list[str]) -> pl.LazyFrame:
        """All rows, each with `_part`, the part that holds it (one scan of them all: a scan per
        part, concatenated, plans 30 times slower over 200 parts)."""
        return scan(files, self._schema(files), self.folder.options, include_file_paths="_part")

    def _again(self, read: Callable[[list[str]], T | None]) -> T:
        """`read` over the parts as they are now, again when they changed while it read (a part
        gone in a compaction, or rewritten without an error row that was answered again):
        `read` raises FileNotFoundError, or returns None when a row it found has moved."""
        for _ in range(TRIES - 1):
            try:
                if (found := read(self._files())) is not None:
                    return found
            except (FileNotFoundError, pl.exceptions.ComputeError):
                pass
            self._columns = ((), {})
        if (found := read(self._files())) is None:
            raise StoreError(f"{self.folder.label}: its parts changed under every reading; try again")
        return found

    def _condition(self, query: Query, frame: pl.LazyFrame) -> pl.Expr:
        conditions = [pl.lit(True)]
        if query.status:
            conditions.append(pl.col("status") == query.status)
        if query.error:
            conditions.append(pl.col("error").str.split(":").list.first() == query.error)
        if query.finish:
            conditions.append(pl.col("finish_reason") == query.finish)
        if query.flag and query.flag != quality.DUPLICATE:
            conditions.append(pl.col("flags").list.contains(query.flag).fill_null(False))
        if query.flag == quality.DUPLICATE:
            share = QualityConfig(**self._config().get("quality", {})).duplicate_share
            conditions.append(pl.col("id").is_in(quality.duplicate_ids(frame, share).collect()["id"].implode()))
        if query.label:
            path, _, value = query.label.partition("=")
            conditions.append(_label_column(path).cast(pl.String).str.to_lowercase() == value.lower())
        if query.text:
            conditions.append(pl.col("answer").str.to_lowercase().str.contains(query.text.lower(), literal=True))
        return pl.all_horizontal(conditions)

    def page(self, query: Query) -> dict[str, Any]:
        """The rows of one page, whole, and how many rows the filter keeps."""
        return self._again(lambda files: self._page(files, query))

    def _page(self, files: list[str], query: Query) -> dict[str, Any] | None:
        if not files:
            return {"total": 0, "offset": 0, "rows": []}
        frame = self._frame(files)
        kept = frame.filter(self._condition(query, frame))
        column = SORTS.get(query.sort.lstrip("-"))
        if column:
            kept = kept.sort(column, descending=query.sort.startswith("-"), nulls_last=True, maintain_order=True)
        limit = max(1, min(query.limit, PAGE_MAX))
        found = pl.collect_all([kept.select(pl.len()), kept.select("_part", "id").slice(max(0, query.offset), limit)])
        total, shown = int(found[0].item()), found[1]
        rows: dict[str, dict[str, Any]] = {}
        for (part,), wanted in shown.group_by("_part"):  # only the parts that hold the page's rows
            read = self._read_part(str(part), files).filter(pl.col("id").is_in(wanted["id"].implode()))
            rows |= {row["id"]: row for row in read.collect().iter_rows(named=True)}
        if len(rows) < shown.height:
            return None  # a part was rewritten meanwhile: read again
        return {"total": total, "offset": query.offset, "rows": [rows[row_id] for row_id in shown["id"]]}

    def _read_part(self, file: str, files: list[str]) -> pl.LazyFrame:
        return scan([file], self._schema(files), self.folder.options)

    def row(self, row_id: str) -> dict[str, Any] | None:
        def read(files: list[str]) -> dict[str, Any]:
            found = self._frame(files).filter(pl.col("id") == row_id).drop("_part").collect() if files else None
            return found.row(-1, named=True) if found is not None and found.height else {}

        return self._again(read) or None

    def summary(self) -> dict[str, Any]:
        """`annotate report`'s figures and the values to filter by; read again when the parts
        change, at most every SUMMARY_TTL_S."""
        files = tuple(self._files())
        seen, at, cached = self._summary
        if files and (files != seen or time.monotonic() - at > SUMMARY_TTL_S):
            cached = self._again(self._facts)
            self._summary = (files, time.monotonic(), cached)
        return cached or {"report": None, "facets": {}}

    def _facts(self, files: list[str]) -> dict[str, Any]:
        if not files:
            return {}
        frame = self._frame(files)

        def counts(expr: pl.Expr) -> list[dict[str, Any]]:
            found = (frame.select(expr.alias("value")).drop_nulls().group_by("value").len()
                     .sort(["len", "value"], descending=[True, False]).collect())
            return [{"value": value, "rows": n} for value, n in found.iter_rows()]

        summary = report.summarize(self.location)
        schema = self._config().get("output_schema")
        return {"report": summary, "facets": {
            "status": counts(pl.col("status")),
            "error": counts(pl.col("error").str.split(":").list.first()),
            "finish": counts(pl.col("finish_reason")),
            "flag": [{"value": flag, "rows": n} for flag, n in summary["flags"].items()],
            "label": [{"value": f"{'.'.join(path)}={_shown(c['value'])}", "rows": c["rows"]}
                      for path in (categories(schema) if schema else [])
                      for c in summary["labels"].get(".".join(path), [])],
        }, "labels": [".".join(path) for path in (categories(schema) if schema else [])]}
