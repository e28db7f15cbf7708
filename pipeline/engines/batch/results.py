"""A batch's output and error files as rows: each line classified as an online reply would be.

Owns: matching result lines to rows by `custom_id` (in any order), and what each means: a 200 is
an answer at the batch price (typed columns read from it under a schema), a 429, 5xx, expired
or cancelled line is asked again in a new batch while the row has tries left, any other status
is a final row error with the provider's words, and a row with no line at all is asked again.
Never: HTTP, the ledger, the journal.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ... import rows
from ...client import ACCOUNT_STATUSES, failure_of
from ...completion import Reply, parse_body
from ...cost.pricing import PriceTable
from ...errors import Rejected
from ...manifest import ManifestRow
from ...sender import Outcome, first_fit
from ...structured import OutputSchema

__all__ = ["Carry", "Reading", "Verdict", "by_custom_id", "errors_of", "verdict"]

log = logging.getLogger(__name__)

_UNFINISHED = ("batch_expired", "batch_cancelled")


@dataclass(frozen=True)
class Carry:
    """What a row's earlier answers that broke the output schema leave for its next batch: the
    messages that ask again, and the paid replies, whose usage and cost its row keeps."""

    messages: tuple[dict[str, Any], ...]
    reply: Reply
    cost_usd: float | None
    asked: int  # times asked again so far


@dataclass(frozen=True)
class Reading:
    """How a run reads answers: prices, the configured model, the output schema, and how often
    an answer that breaks it is asked again."""

    prices: PriceTable
    model: str
    schema: OutputSchema | None
    parse_retries: int


@dataclass(frozen=True)
class Verdict:
    """A row's fate in a batch: an outcome to record, or None to ask again in a new batch
    (`why`, when it has no tries left, is its retryable error; `carry`, for an answer that
    broke the schema, goes with it)."""

    outcome: Outcome | None
    why: str = ""
    charged_usd: float = 0.0
    carry: Carry | None = None


def by_custom_id(files: Iterable[bytes]) -> dict[str, dict[str, Any]]:
    """The result lines of a batch's output and error files, by custom_id (a later line wins);
    a line that is not a JSON object with a custom_id is left out (its row is asked again)."""
    found: dict[str, dict[str, Any]] = {}
    for content in files:
        for raw in content.splitlines():
            try:
                line = json.loads(raw) if raw.strip() else None
            except ValueError:
                line = None
            if isinstance(line, dict) and isinstance(line.get("custom_id"), str):
                found[line["custom_id"]] = line
            elif raw.strip():
                log.warning("a result line that names no row is left out: %r", raw[:200])
    return found


def verdict(row: ManifestRow, line: Mapping[str, Any] | None, batch: Mapping[str, Any], tries: int,
            reading: Reading, carry: Carry | None = None) -> Verdict:
    """What one row's result line (None: the batch has none for it) makes of the row, after
    what its earlier answers left (`carry`)."""
    if line is None:
        return Verdict(None, f"batch {batch['id']} ended {batch.get('status')} without an answer for this row"
                             + (f" ({errors_of(batch)})" if batch.get("status") == "failed" else ""))
    response = line.get("response")
    error = line["error"] if isinstance(line.get("error"), dict) else None
    if response is not None and not isinstance(response, dict):
        return Verdict(None, f"batch {batch['id']} answered this row with no response it could read")
    if response is None:
        code = (error or {}).get("code") or "no_response"
        message = (error or {}).get("message") or ""
        if code in _UNFINISHED:
            return Verdict(None, f"{code} in batch {batch['id']}")
        return Verdict((rows.failed(row, f"request: {code} {message}".strip(), tries, retryable=False), code))
    status = int(response.get("status_code") or 0)
    body = json.dumps(response.get("body")).encode()
    if status != 200:
        failure = failure_of(status, {}, body)
        if not isinstance(failure, Rejected):
            return Verdict(None, f"request: {failure} (batch {batch['id']})")
        retryable = status in ACCOUNT_STATUSES
        return Verdict((rows.failed(row, f"request: {failure}", tries, retryable), status))
    try:
        reply = parse_body(body).timed(_waited_ms(batch), tries)
    except (ValueError, TypeError, AttributeError) as exc:
        return Verdict(None, f"200 with a body that is not a chat completion ({exc}) in batch {batch['id']}")
    return _answered(row, reply, reading, carry)


def _answered(row: ManifestRow, reply: Reply, reading: Reading, carry: Carry | None) -> Verdict:
    priced = reply.model if reply.model and reading.prices.find(reply.model) else reading.model
    new_cost = reading.prices.cost_usd(priced, reply.usage, batch=True) if reply.usage else None
    charged = new_cost or 0.0
    total = reply if carry is None else reply.after(carry.reply)
    cost = new_cost if carry is None else None if new_cost is None or carry.cost_usd is None else new_cost + carry.cost_usd
    if reading.schema is None:
        return Verdict((rows.answered(row, total, cost, cost), None), charged_usd=charged)
    choice, values, problem = first_fit(reading.schema, reply)
    if values is not None:
        return Verdict((rows.answered(row, total, cost, cost, values, choice), None), charged_usd=charged)
    asked = 0 if carry is None else carry.asked
    if not reply.refusal and asked < reading.parse_retries:
        again = tuple(reading.schema.ask_again(reply.answers[0], problem))
        return Verdict(None, f"parse_error: the answer {problem}", charged,
                       Carry((*(carry.messages if carry else ()), *again), total, cost, asked + 1))
    if reply.refusal:
        problem = f"is a refusal: {reply.refusal}"
    return Verdict((rows.unparsed(row, total, cost, cost, problem), None), charged_usd=charged)


def _waited_ms(batch: Mapping[str, Any]) -> float:
    """From the batch's creation to its end: what its rows waited for their answers."""
    ended = next((batch[k] for k in ("completed_at", "expired_at", "cancelled_at", "failed_at") if batch.get(k)), None)
    return max(0.0, (ended - batch["created_at"]) * 1000.0) if ended and batch.get("created_at") else 0.0


def errors_of(batch: Mapping[str, Any]) -> str:
    """The provider's words on why a batch failed."""
    found = (batch.get("errors") or {}).get("data") or []
    return "; ".join(f"{e.get('code')}: {e.get('message')}" + (f" (line {e['line']})" if e.get("line") else "")
                     for e in found) or "no reason given"
