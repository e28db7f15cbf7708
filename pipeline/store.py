"""The output directory: Parquet parts written whole or not at all, run metadata, done ids.

Owns: file names, atomic writes, which ids are already answered, and replacing an earlier
error row when its id is answered again. Never: deciding what a row holds. One writer (the
runner) drives it; the blocking methods are meant to run off the event loop.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import StoreError

__all__ = ["Store", "RUN_FILE"]

RUN_FILE = "_run.json"
_PARTS = "part-*.parquet"


def _write_atomically(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # hidden and not *.parquet: readers never see it half-written
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Store:
    def __init__(self, directory: Path, schema: pa.Schema) -> None:
        self.dir = directory
        self._schema = schema
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"output.dir: cannot create {directory}: {exc.strerror}") from None
        self._earlier = sorted(directory.glob(_PARTS))
        # time orders the parts of successive runs; the random tail keeps two runs in one second apart
        self._stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        self._seq = 0
        outcomes = self._outcomes()
        self.done = frozenset(outcomes.filter(pl.col("status") == "ok")["id"].to_list())
        self._retrying = frozenset(outcomes.filter(pl.col("status") != "ok")["id"].to_list()) - self.done
        self._superseded: set[str] = set()

    def _outcomes(self) -> pl.DataFrame:
        """Id and status of every row already written; only those two columns are read."""
        if not self._earlier:
            return pl.DataFrame(schema={"id": pl.String, "status": pl.String})
        try:
            return pl.scan_parquet(self._earlier).select("id", "status").collect()
        except pl.exceptions.PolarsError as exc:
            raise StoreError(f"output.dir: cannot read the parts in {self.dir}: {exc}") from None

    def write_run_info(self, info: dict[str, Any]) -> None:
        text = json.dumps(info, indent=2, default=str)
        _write_atomically(self.dir / RUN_FILE, lambda p: p.write_text(text, encoding="utf-8"))

    def write(self, rows: list[dict[str, Any]]) -> Path:
        """One new part holding `rows`, visible whole or not at all."""
        self._seq += 1
        path = self.dir / f"part-{self._stamp}-{self._seq:05d}.parquet"
        table = pa.Table.from_pylist(rows, schema=self._schema)
        _write_atomically(path, lambda p: pq.write_table(table, p))
        self._superseded.update(r["id"] for r in rows if r["id"] in self._retrying)
        return path

    def close(self) -> None:
        """Drop earlier error rows whose ids this run answered again: one row per id stays."""
        if self._superseded:
            self._drop(self._earlier, self._superseded)

    def _drop(self, parts: Iterable[Path], ids: set[str]) -> None:
        gone = pa.array(sorted(ids), pa.string())
        for part in parts:
            table = pq.read_table(part)
            dropped = pc.is_in(table["id"], value_set=gone)
            if not pc.any(dropped).as_py():
                continue
            kept = table.filter(pc.invert(dropped))
            if kept.num_rows:
                _write_atomically(part, lambda p: pq.write_table(kept, p))
            else:
                part.unlink()
