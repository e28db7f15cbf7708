"""The batch engine's ledger: each shard's state and rows, in the output directory's journal.

Owns: two tables beside the journal's outcomes (the same SQLite file, a connection of its own):
`shards` (a shard's state as it moves planned -> uploaded -> created -> collected, with its
file id, batch id, expiry and worst-case cost) and `asked` (which shard holds each row now, how
many batches it was put in, whether its outcome was recorded, the row itself, pickled as
the journal pickles outcomes, to make its output row from the answer, and what its earlier
answers leave to the next batch, pickled too). Each step is committed before the next is taken, so a run
killed at any moment finds where every shard got to. Never: outcomes (the journal), HTTP.
"""

from __future__ import annotations

import pickle
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .journal import JOURNAL_FILE

__all__ = ["Asked", "Ledger", "Shard"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS shards (
    name TEXT PRIMARY KEY, state TEXT NOT NULL, lines INTEGER NOT NULL, worst_usd REAL NOT NULL,
    planned_at REAL NOT NULL, file_id TEXT, batch_id TEXT, expires_at INTEGER, status TEXT);
CREATE TABLE IF NOT EXISTS asked (id TEXT PRIMARY KEY, shard TEXT, tries INTEGER NOT NULL, row BLOB,
                                  done INTEGER NOT NULL DEFAULT 0, carry BLOB);
"""


@dataclass(frozen=True)
class Shard:
    name: str
    state: str  # planned, uploaded, created or collected
    lines: int
    worst_usd: float  # what its answers could cost at most, held against the budget until collected
    planned_at: float  # time.time()
    file_id: str | None = None
    batch_id: str | None = None
    expires_at: int | None = None
    status: str | None = None  # the provider's, when last seen


@dataclass(frozen=True)
class Asked:
    shard: str | None  # the shard under way that holds the row, if any
    tries: int  # batches it was put in
    done: bool  # its outcome is recorded
    carry: Any  # what its earlier answers leave to the next batch, or None


class Ledger:
    def __init__(self, directory: Path) -> None:
        self._db = sqlite3.connect(directory / JOURNAL_FILE, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def plan(self, name: str, rows: Sequence[tuple[str, Any]], worst_usd: float) -> Shard:
        """A shard whose file is written: its rows ((id, row) pairs) are in it from now on, one
        try more each."""
        shard = Shard(name, "planned", len(rows), worst_usd, time.time())
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("INSERT INTO shards (name, state, lines, worst_usd, planned_at) VALUES (?, ?, ?, ?, ?)",
                         (name, shard.state, shard.lines, worst_usd, shard.planned_at))
        self._db.executemany("INSERT INTO asked (id, shard, tries, row) VALUES (?, ?, 1, ?) ON CONFLICT(id) "
                             "DO UPDATE SET shard = excluded.shard, tries = tries + 1, row = excluded.row",
                             [(row_id, name, pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL))
                              for row_id, row in rows])
        self._db.execute("COMMIT")
        return shard

    def uploaded(self, name: str, file_id: str) -> None:
        self._db.execute("UPDATE shards SET state = 'uploaded', file_id = ? WHERE name = ?", (file_id, name))

    def created(self, name: str, batch_id: str, expires_at: int | None, status: str) -> None:
        self._db.execute("UPDATE shards SET state = 'created', batch_id = ?, expires_at = ?, status = ? WHERE name = ?",
                         (batch_id, expires_at, status, name))

    def seen(self, name: str, status: str) -> None:
        self._db.execute("UPDATE shards SET status = ? WHERE name = ?", (status, name))

    def collected(self, name: str) -> None:
        """The shard's answers are journalled: its rows are in no shard any more."""
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("UPDATE shards SET state = 'collected' WHERE name = ?", (name,))
        self._db.execute("UPDATE asked SET shard = NULL WHERE shard = ?", (name,))
        self._db.execute("COMMIT")

    def shards(self, collected: bool = True) -> list[Shard]:
        """The shards, oldest first; without those collected when `collected` is False."""
        where = "" if collected else "WHERE state != 'collected'"
        cursor = self._db.execute("SELECT name, state, lines, worst_usd, planned_at, file_id, batch_id, expires_at, "
                                  f"status FROM shards {where} ORDER BY planned_at, name")
        return [Shard(*row) for row in cursor]

    def open_shards(self) -> list[Shard]:
        return self.shards(collected=False)

    def new_run(self) -> None:
        """A run starts: rows in no shard under way get their tries back and may be asked again
        (their outcome, if final, is in the store, whose done ids a run skips)."""
        self._db.execute("UPDATE asked SET tries = 0, done = 0 WHERE shard IS NULL")

    def give_back_try(self, name: str) -> None:
        """The shard's batch never ran (the provider refused its file): that try does not count."""
        self._db.execute("UPDATE asked SET tries = max(tries - 1, 0) WHERE shard = ?", (name,))

    def asked(self, ids: Sequence[str]) -> dict[str, Asked]:
        """What the ledger knows of these ids (absent: never in a batch, nothing recorded)."""
        found: dict[str, Asked] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start:start + 500])
            marks = ",".join("?" * len(chunk))
            cursor = self._db.execute(f"SELECT id, shard, tries, done, carry FROM asked WHERE id IN ({marks})", chunk)
            found |= {row_id: Asked(shard, tries, bool(done), _loaded(carry))
                      for row_id, shard, tries, done, carry in cursor}
        return found

    def finished(self, ids: Sequence[str]) -> None:
        """These ids' outcomes are recorded: not to be put in a batch again by this run or the next."""
        self._db.executemany("INSERT INTO asked (id, shard, tries, done) VALUES (?, NULL, 0, 1) "
                             "ON CONFLICT(id) DO UPDATE SET done = 1", [(row_id,) for row_id in ids])

    def rows_of(self, name: str) -> list[tuple[Any, int, Any]]:
        """The rows a shard holds whose outcome is not recorded yet, each with how many batches
        it was put in and what earlier answers left it."""
        cursor = self._db.execute("SELECT row, tries, carry FROM asked WHERE shard = ? AND done = 0", (name,))
        return [(pickle.loads(blob), tries, _loaded(carry)) for blob, tries, carry in cursor]

    def carry(self, row_id: str, carry: Any) -> None:
        """What a row's answer leaves to its next batch (asking again for a broken answer is not
        a try of those batch.resubmit counts)."""
        self._db.execute("UPDATE asked SET carry = ?, tries = max(tries - 1, 0) WHERE id = ?",
                         (pickle.dumps(carry, protocol=pickle.HIGHEST_PROTOCOL), row_id))


def _loaded(blob: bytes | None) -> Any:
    return None if blob is None else pickle.loads(blob)
