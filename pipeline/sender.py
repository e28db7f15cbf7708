"""One row's requests, from a prepared body to an output row: the budget, the endpoint with most
room, its limiter and client, and asking again when an answer breaks the output schema.

Owns: what a request may cost before it is sent, which endpoint it goes to, turning replies
and failures into output rows. Never: the manifest, the store or progress (the engine that
calls it owns those). Both engines run this code as it is: the local one in its event loop, the
Ray one inside each HTTP actor.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import payload, rows
from .client import ACCOUNT_STATUSES, Client, read_key
from .completion import Reply
from .config import EndpointConfig, RunConfig
from .cost.budget import Purse
from .cost.pricing import PriceTable
from .errors import Halted, Rejected, RequestFailed, RowInputError
from .limits import Limits
from .manifest import ManifestRow
from .structured import OutputSchema, Unusable

log = logging.getLogger(__name__)

__all__ = ["Outcome", "Sender", "first_fit"]

# an output row, and what makes its failure alike others (an account-level status, or
# "response_format"), so an engine can stop when every row would fail the same way
Outcome = tuple[dict[str, Any], int | str | None]


@dataclass(frozen=True)
class _Paid:
    """A reply and what it cost: `cost` by the provider's usage, `charged` what the budget counted."""

    reply: Reply
    cost: float | None
    charged: float | None

    def then(self, later: _Paid) -> _Paid:
        """A follow-up's reply, with both requests' usage and cost."""
        def add(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else a + b

        return _Paid(later.reply.after(self.reply), add(self.cost, later.cost), add(self.charged, later.charged))

    def row(self, row: ManifestRow, values: dict[str, Any] | None = None, choice: int = 0) -> dict[str, Any]:
        return rows.answered(row, self.reply, self.cost, self.charged, values, choice)


def first_fit(schema: OutputSchema, reply: Reply) -> tuple[int, dict[str, Any] | None, str]:
    """The first choice that fits the schema and its values, or what was wrong with the first."""
    problem = ""
    for i, text in enumerate(reply.answers):
        try:
            return i, schema.read(text), ""
        except Unusable as exc:
            problem = problem or str(exc)
    if reply.finish_reason == "length":
        problem += " (cut at request.max_tokens: raise it)"
    return 0, None, problem


Inline = Callable[[], Awaitable[payload.Prepared]]
# A provider's 400 when it cannot fetch an image URL says so: OpenAI's "Timeout while
# downloading <url>.", "Error while downloading <url>.".
_COULD_NOT_DOWNLOAD = re.compile(r"download", re.IGNORECASE)


Deliver = Callable[[Outcome], Awaitable[None]]


def _noting(deliver: Deliver, notes: str | None) -> Deliver:
    """`deliver` with the images' notes (converted, downscaled, ...) put in the row, if any."""
    return functools.partial(_noted, deliver, notes) if notes else deliver


async def _noted(deliver: Deliver, notes: str, outcome: Outcome) -> None:
    row, kind = outcome
    await deliver(({**row, "image_notes": notes}, kind))


class Sender:
    """Made inside the event loop it sends from: its clients open their connection pools there.
    `slots` is each endpoint's concurrency in this process, `stopped` says True once no new
    request may start (a signal, or a stop)."""

    def __init__(self, cfg: RunConfig, endpoints: Sequence[EndpointConfig], slots: Sequence[int], limits: Limits,
                 purse: Purse, schema: OutputSchema | None, stopped: Callable[[], bool]) -> None:
        self.request = cfg.request
        keys = [read_key(endpoint) for endpoint in endpoints]  # every key before any connection pool opens
        self.clients = [Client(endpoint, keys[i], limits[i], concurrency=slots[i],
                               max_attempts=cfg.limits.max_attempts) for i, endpoint in enumerate(endpoints)]
        self.limits = limits
        self.purse = purse
        self.prices = PriceTable(cfg.pricing)
        self.schema = schema
        self.stopped = stopped

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()

    async def annotate(self, row: ManifestRow, prepared: payload.Prepared,
                       deliver: Deliver, inline: Inline | None = None) -> None:
        """Send one row and hand its outcome to `deliver`, within the endpoint's concurrency slot:
        the slot is held until `deliver` returns, so an engine that delivers to disk loses at
        most `concurrency` answers to a kill. Nothing is delivered for a row that was not sent
        (the budget ran out, or the run is stopping): it stays to do. `inline` (rows whose
        remote images went as URLs) prepares the row again with them fetched and inlined: asked
        once more that way when the provider says it could not download one."""
        tokens = prepared.tokens
        endpoint = await self.limits.pick(tokens.input + tokens.output_max)
        limiter, client = self.limits[endpoint], self.clients[endpoint]
        async with limiter.slot():
            try:
                paid, prepared = await self._send_first(client, endpoint, prepared, inline)
            except (RequestFailed, RowInputError) as exc:
                await _noting(deliver, prepared.image_notes)(self._failed(row, exc))
                return
            if paid is None:
                return
            deliver = _noting(deliver, prepared.image_notes)
            answer = await self._read(row, client, endpoint, prepared.body, prepared.tokens, paid) if self.schema \
                else paid.row(row)
            await deliver((answer, None))

    async def _send_first(self, client: Client, endpoint: int, prepared: payload.Prepared,
                          inline: Inline | None) -> tuple[_Paid | None, payload.Prepared]:
        try:
            return await self._send(client, endpoint, prepared.body, prepared.tokens), prepared
        except Rejected as exc:
            if inline is None or exc.status != 400 or not _COULD_NOT_DOWNLOAD.search(str(exc)):
                raise
            log.info("the provider could not download an image (%s): asking again with it inlined", exc)
        inlined = await inline()
        return await self._send(client, endpoint, inlined.body, inlined.tokens), inlined

    async def _send(self, client: Client, endpoint: int, body: dict[str, Any],
                    tokens: payload.TokenEstimate) -> _Paid | None:
        """One request within the limits and the budget; None when it was not sent."""
        reserved = tokens.input + tokens.output_max  # what a tokens-per-minute limit counts
        worst = self.prices.list_usd(self.request.model, tokens.input_max, tokens.output_max) or 0.0
        if not await self.purse.hold(worst):
            return None
        if self.stopped():
            self.purse.release(worst, 0.0)
            return None
        try:
            reply = await client.complete(body, reserved)
        except RequestFailed:
            self.purse.release(worst, 0.0)  # errors are not billed
            raise
        except Halted:  # the limiter says the run is stopping
            self.purse.release(worst, 0.0)
            return None
        # what a tokens-per-minute limit counted: the prompt as the provider read it, and max_tokens
        counted = reply.usage.prompt_tokens + tokens.output_max if reply.usage else reserved
        self.limits[endpoint].answered(reserved, counted)
        cost = self._cost(reply)
        charged = worst if cost is None else cost  # no usage: assume the worst
        self.purse.release(worst, charged)
        return _Paid(reply, cost, charged if worst else None)

    async def _read(self, row: ManifestRow, client: Client, endpoint: int, body: dict[str, Any],
                    tokens: payload.TokenEstimate, paid: _Paid) -> dict[str, Any]:
        """The typed columns of the first choice that fits the schema, asking again up to
        request.parse_retries times with what was wrong; else a parse_error row keeping the
        raw answer. Every request's usage counts in the row."""
        assert self.schema is not None
        retries = self.request.parse_retries
        while True:
            choice, values, problem = first_fit(self.schema, paid.reply)
            if values is not None:
                return paid.row(row, values, choice)
            if retries == 0 or paid.reply.refusal:
                break
            retries -= 1
            follow = self.schema.ask_again(paid.reply.answers[0], problem)
            body, tokens = payload.follow_up(body, tokens, follow, self.request.model)
            try:
                more = await self._send(client, endpoint, body, tokens)
            except RequestFailed as exc:
                problem += f" (asking again failed: {exc})"
                break
            if more is None:
                break
            paid = paid.then(more)
        if paid.reply.refusal:
            problem = f"is a refusal: {paid.reply.refusal}"
        return rows.unparsed(row, paid.reply, paid.cost, paid.charged, problem)

    def _failed(self, row: ManifestRow, exc: RequestFailed | RowInputError) -> Outcome:
        """The error row of a request that failed, and what makes failures alike."""
        if isinstance(exc, RowInputError):  # fetching an image the provider could not download
            return rows.image_failed(row, exc, attempts=1), None
        if isinstance(exc, Rejected) and exc.status == 400 and self.schema and "response_format" in str(exc):
            fallback = "json_object (or prompt)" if self.schema.mode == "json_schema" else "prompt"
            message = f"request: {exc}; the endpoint refuses this response_format: set request.structured: {fallback}"
            return rows.failed(row, message, exc.attempts, retryable=True), "response_format"
        # a 4xx is final, unless it says the key or the account is wrong: fix those and rerun
        retryable = not isinstance(exc, Rejected) or exc.status in ACCOUNT_STATUSES
        return rows.failed(row, f"request: {exc}", exc.attempts, retryable), exc.status

    def _cost(self, reply: Reply) -> float | None:
        if reply.usage is None:
            return None
        model = reply.model if reply.model and self.prices.find(reply.model) else self.request.model
        return self.prices.cost_usd(model, reply.usage)
