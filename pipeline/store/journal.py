"""The journal: every received outcome on disk before it counts as done.

Owns: one SQLite database in the output directory (WAL mode, full sync), one transaction
per batch of outcomes, `id` as primary key so an id holds one outcome only, and the record
of a part being cut from it, so a crash between writing a part and retiring its rows is
finished on the next start instead of writing the rows twice. Never: Parquet, deciding
what a row holds.

Rows are pickled: they hold whatever Python values the kept manifest columns have (dates,
decimals, nested lists). The journal is a private file of the output directory; do not
open one from a source you do not trust.
"""

from __future__ import annotations

import pickle
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["Journal", "JOURNAL_FILE"]

JOURNAL_FILE = "_journal.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, row BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS cuts (part TEXT PRIMARY KEY, upto INTEGER NOT NULL);
"""


class Journal:
    def __init__(self, directory: Path) -> None:
        self.path = directory / JOURNAL_FILE
        # the runner calls it from worker threads, one call at a time
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit survives a power cut, not only a kill
        self._db.executescript(_SCHEMA)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Record outcomes in one transaction; a later outcome for an id replaces the earlier."""
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO outcomes (id, row) VALUES (?, ?)",
                [(row["id"], pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL)) for row in rows],
            )

    def pending(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM outcomes").fetchone()[0])

    def begin_cut(self, part: str) -> int:
        """Mark every outcome recorded so far as going into `part`; returns the last seq."""
        with self._transaction() as db:
            upto = int(db.execute("SELECT coalesce(max(seq), 0) FROM outcomes").fetchone()[0])
            db.execute("INSERT OR REPLACE INTO cuts (part, upto) VALUES (?, ?)", (part, upto))
        return upto

    def rows(self, upto: int) -> list[dict[str, Any]]:
        cursor = self._db.execute("SELECT row FROM outcomes WHERE seq <= ? ORDER BY seq", (upto,))
        return [pickle.loads(blob) for (blob,) in cursor]

    def finish_cut(self, part: str, upto: int) -> None:
        """The part is in place: retire the outcomes it holds."""
        with self._transaction() as db:
            db.execute("DELETE FROM outcomes WHERE seq <= ?", (upto,))
            db.execute("DELETE FROM cuts WHERE part = ?", (part,))

    def open_cuts(self) -> list[tuple[str, int]]:
        """Cuts begun and not finished, as (part, upto), oldest first."""
        return [(str(p), int(u)) for p, u in self._db.execute("SELECT part, upto FROM cuts ORDER BY upto")]

    def close(self) -> None:
        self._db.close()
