"""What every engine shares on the machine that runs `annotate`: the rows still to do, the one
writer of the store (journal, parts), progress, the summary, stopping early when every request
fails alike, and shutting down on a signal.

Owns: recording outcomes. Never: preparing or sending requests (the engines do).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..client import ACCOUNT_STATUSES
from ..config import RunConfig
from ..cost.budget import Budget
from ..errors import ManifestError
from ..manifest import Manifest, ManifestRow
from ..quality import flags_of
from ..sender import Outcome
from ..store.ledger import Ledger
from ..store.parts import Store

__all__ = ["Driver", "NO_KEY", "Summary", "stopping_on_signals"]

log = logging.getLogger(__name__)

PART_ROWS = 5_000  # a part is cut from the journal after this many rows ...
PART_SECONDS = 30.0  # ... or this many seconds, whichever comes first
GRACE_S = 30.0  # after a first signal, in-flight requests get this long to finish
# This many outcomes in a row with the same account-level status (401, 403, 404) stop the
# run: a wrong key or model name would otherwise fail every row of the manifest one by one.
ACCOUNT_STOP_AFTER = 3
NO_KEY = "no_key"  # the kind of failure of a row sent from a node where the key variable is unset


@dataclass
class Summary:
    output_dir: Path | str
    total: int = 0  # rows in the manifest
    resumed: int = 0  # answered by earlier runs
    ok: int = 0
    failed: int = 0
    retried: int = 0  # rows that had failed in an earlier run and were asked again
    flagged: int = 0  # answered rows with flags asked again (--retry-flagged)
    kept_earlier: int = 0  # of those, rows whose new asking failed: their earlier answer stays
    failed_before: int = 0  # rows that failed for good in earlier runs and were not asked again
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    priced: bool = True  # False when some answered row had no known price
    elapsed_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    budget_usd: float | None = None  # limits.max_cost_usd
    spent_usd: float = 0.0  # by the directory, earlier runs included
    stopped_at_budget: bool = False
    held: str = ""  # the last time the pace was held below a configured limit: at what rate, and why

    def count(self, row: dict[str, Any], retried: bool, flagged: bool = False) -> None:
        """One outcome of this run; `flagged`: of a flagged row asked again, whose earlier
        answer stays when this one failed."""
        self.retried += retried
        self.flagged += flagged
        if "prompt_tokens" in row:  # answered, perhaps unparseable: paid for either way
            self.prompt_tokens += row["prompt_tokens"] or 0
            self.completion_tokens += row["completion_tokens"] or 0
            if row["cost_usd"] is None:
                self.priced = False
            else:
                self.cost_usd += row["cost_usd"]
        if row["status"] == "ok":
            self.ok += 1
        elif flagged:
            self.kept_earlier += 1
        else:
            self.failed += 1
            kind = row["error"].split(":", 1)[0]
            self.errors[kind] = self.errors.get(kind, 0) + 1


@contextlib.contextmanager
def stopping_on_signals(driver: Driver, grace_s: float = GRACE_S) -> Iterator[None]:
    """A first SIGINT or SIGTERM lets requests in flight finish for up to `grace_s` and starts
    no new ones; a second cancels the running task at once (the journal holds every outcome the
    engine handed over). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    seen = []
    timers: list[asyncio.TimerHandle] = []

    def handle() -> None:
        seen.append(1)
        if len(seen) > 1:
            main.cancel()
            return
        driver.signalled = True
        if grace_s:
            log.warning("stopping: waiting up to %.0f s for requests in flight (signal again to stop now)", grace_s)
        timers.append(loop.call_later(grace_s, main.cancel))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handle)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        for timer in timers:
            timer.cancel()


class Driver:
    """What both engines share on the machine that runs `annotate`: the rows still to do, the one
    writer of the store, progress, the summary, and stopping when every row fails alike."""

    def __init__(self, cfg: RunConfig, manifest: Manifest, store: Store, bar: tqdm[Any], summary: Summary) -> None:
        self.cfg = cfg
        self.manifest = manifest
        self.store = store
        self.bar = bar
        self.summary = summary
        self.budget = Budget(cfg.limits.max_cost_usd, store.spent_usd)
        self.unpublished = 0  # rows journalled since the last part
        self.cut_at = time.monotonic()
        self.held: Callable[[], str] = str  # what holds the pace below the limits, if anything (set by an engine)
        self.stop_reason: str | None = None
        self.signalled = False  # a signal came (or the run was cancelled): no new requests
        self.manifest_error: ManifestError | None = None
        self._alike: tuple[int | str | None, int] = (None, 0)
        self._writing = threading.Lock()  # an engine may still record from a thread while the run closes
        self._closed = False
        self._ledger: Ledger | None = None

    def stopped(self) -> bool:
        """True once no new request may start."""
        return bool(self.stop_reason or self.signalled or self.budget.exhausted)

    def todo(self, limit: int | None) -> Iterator[list[ManifestRow]]:
        """Manifest rows not done yet, each id once, in batches; a bad line far down the file
        ends them and stops the run once what is in flight is kept."""
        try:
            yield from self.manifest.batches(skip=self.store.done, limit=limit, only=self.store.redo)
        except ManifestError as exc:
            self.manifest_error = exc
            self.stop_reason = f"the manifest could not be read on: {exc}"

    def record(self, outcomes: Sequence[Outcome]) -> None:
        """Journal outcomes in one transaction and count them; blocking, so engines call it off
        their event loop. A part is cut every PART_ROWS rows or PART_SECONDS. Outcomes that come
        after `close` are dropped: their rows stay to do."""
        with self._writing:
            if not self._closed:
                self._record(outcomes)

    def ledger(self) -> Ledger:
        """The batch engine's shards, in the store's journal (opened on first use)."""
        if self._ledger is None:
            self._ledger = Ledger(self.store.local)
        return self._ledger

    def close(self) -> None:
        """The last part; a kill before this leaves it in the journal for next time."""
        with self._writing:
            self._closed = True
            if self._ledger is not None:
                self._ledger.close()
            self.store.close()

    def _record(self, outcomes: Sequence[Outcome]) -> None:
        finished = [row for row in (self._finished(row) for row, _ in outcomes) if row is not None]
        if finished:
            self.store.record(finished)
        for row, kind in outcomes:
            self._watch_alike(kind, row)
            self.summary.count(row, retried=row["id"] in self.store.failed_ids,
                               flagged=row["id"] in self.store.redo_ids)
        self.unpublished += len(outcomes)
        self.bar.update(len(outcomes))
        self.bar.set_postfix(self._postfix(), refresh=False)
        if self.unpublished >= PART_ROWS or time.monotonic() - self.cut_at >= PART_SECONDS:
            self.store.cut()
            self.unpublished = 0
            self.cut_at = time.monotonic()

    def _finished(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """The row as written: with its flags, and the cost of the answers it replaces. A
        flagged row asked again that failed keeps its earlier answer (None: nothing to write)."""
        row = {**row, "flags": flags_of(row, self.cfg.quality, prose=self.cfg.output_schema is None)}
        if row["id"] in self.store.redo_ids and row["status"] != "ok":
            return self._kept_earlier(row)
        cost, charged = self.store.paid_before.get(row["id"], (None, None))
        if cost is None and charged is None:
            return row
        answered = "prompt_tokens" in row  # an answer, perhaps one that fits no schema: paid for
        new = row.get("cost_usd")
        return {**row, "earlier_cost_usd": cost,
                "cost_usd": (new + (cost or 0.0)) if new is not None else None if answered else cost,
                "charged_usd": (charged or 0.0) + (row.get("charged_usd") or 0.0)}

    def _kept_earlier(self, failed: dict[str, Any]) -> dict[str, Any] | None:
        """The earlier answer of a flagged row whose new asking failed, written again with what
        that asking cost when it was paid for (an answer that fit no schema)."""
        cost, charged = failed.get("cost_usd"), failed.get("charged_usd")
        kept = self.store.row(failed["id"]) if cost is not None or charged is not None else None
        if kept is None:
            return None
        return {**kept, "cost_usd": None if kept["cost_usd"] is None or cost is None else kept["cost_usd"] + cost,
                "earlier_cost_usd": (kept.get("earlier_cost_usd") or 0.0) + (cost or 0.0),
                "charged_usd": (kept["charged_usd"] or 0.0) + (charged or 0.0)}

    def _watch_alike(self, kind: int | str | None, row: dict[str, Any]) -> None:
        """Stop after ACCOUNT_STOP_AFTER failures in a row of one kind that every row would meet:
        an account-level status, or an endpoint that refuses the response_format."""
        alike = kind in ACCOUNT_STATUSES or kind in ("response_format", NO_KEY)
        last, streak = self._alike
        streak = streak + 1 if alike and kind == last else int(alike)
        self._alike = (kind, streak)
        if streak >= ACCOUNT_STOP_AFTER and not self.stop_reason:
            keys = ", ".join(f"${target.api_key_env}" for target in self.cfg.targets)
            advice = "" if kind in ("response_format", NO_KEY) else f"; check the key in {keys}, the account and request.model"
            self.stop_reason = f"{streak} requests in a row failed alike ({row['error']}){advice}"

    def _postfix(self) -> dict[str, Any]:
        s, limit = self.summary, self.budget.limit_usd
        cost = f"${s.cost_usd:.4f}" + (f" (dir ${self.budget.spent_usd:.4f} of ${limit:g})" if limit else "")
        if held := self.held():
            s.held = held
        return {"errors": s.failed, "tokens": s.prompt_tokens + s.completion_tokens, **({"cost": cost} if s.priced else {}),
                **({"pace": held} if held else {})}
