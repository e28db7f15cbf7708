"""Batch files: rows' requests as JSONL lines, cut into shards the provider takes.

Owns: the line of one row (`custom_id` the row's id, a POST to the chat-completions URL, the
body as it would go online, without streaming) and cutting lines into files of at most
`max_requests` lines, `max_bytes` bytes and, under a budget, `room_usd` of worst-case cost.
Never: HTTP, the ledger.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...manifest import ManifestRow
from .api import LINE_URL

__all__ = ["ShardFile", "line_of"]

_STREAMING = ("stream", "stream_options")  # a batch answers whole


def line_of(row_id: str, body: dict[str, Any]) -> bytes:
    """One row's line of a batch file, newline included."""
    whole = {k: v for k, v in body.items() if k not in _STREAMING}
    return json.dumps({"custom_id": row_id, "method": "POST", "url": LINE_URL, "body": whole},
                      ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


@dataclass
class ShardFile:
    """A shard being written: its lines go to `path` as they come; `fits` says whether one more may."""

    path: Path
    max_requests: int
    max_bytes: int
    room_usd: float | None  # the budget's room; None: no budget
    rows: list[tuple[ManifestRow, str | None]] = field(default_factory=list)  # each with its image_notes
    size: int = 0
    worst_usd: float = 0.0

    def __post_init__(self) -> None:
        self._file = self.path.open("wb")

    def never_fits(self, line: bytes) -> bool:
        """A line larger than a whole file may be."""
        return len(line) > self.max_bytes

    def fits(self, line: bytes, worst_usd: float) -> bool:
        if len(self.rows) >= self.max_requests or self.size + len(line) > self.max_bytes:
            return False
        return self.room_usd is None or self.worst_usd + worst_usd <= self.room_usd

    def add(self, row: ManifestRow, notes: str | None, line: bytes, worst_usd: float) -> None:
        self._file.write(line)
        self.rows.append((row, notes))
        self.size += len(line)
        self.worst_usd += worst_usd

    def close(self) -> None:
        """Written through to disk before the ledger names it."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
