"""The bundled OpenAI-compatible chat-completions server, for dry runs, demos, tests and benchmarks.

Owns: a real HTTP server on loopback (starlette + uvicorn, in a thread or in the foreground);
auth checks; request and token rate limits enforced as providers do (`meters`); seeded faults (429, 5xx, hangs,
malformed bodies, dropped connections) and faults scripted per marker; seeded flaws of
structured answers (invalid JSON, broken schema) per choice; refusing `response_format` as
gateways without structured output do; a log of what it received; CLI flags for its settings;
the Batch API (`batches`), whose lines are answered as the same requests online.
Never: computing an answer (checks and what a request asks: `request`; image facts:
`image_facts`; answer texts and usage: `answers`; completion JSON, SSE events and error bodies:
`wire`), an HTTP client (no httpx), hosts beyond loopback,
fetching image URLs, keeping API keys.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import logging
import math
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .. import serving
from ..config import SimulatorSettings
from . import meters
from .answers import answer_texts, count_usage
from .batches import BatchDesk
from .image_facts import ImageCache
from .meters import Meter, go_duration, seconds
from .request import Parsed, parse
from .wire import (
    JSON,
    Answer,
    Invalid,
    chunk_events,
    completion_body,
    completion_head,
    error_body,
    models_body,
)

__all__ = ["LogEntry", "Simulator", "running", "serve"]

Action = int | Literal["hang", "malformed", "drop"]  # what a plan may script: a status or a fault

_FAULTS: tuple[tuple[str, Action], ...] = (  # drawn in this order against the cumulative rates
    ("429", 429), ("500", 500), ("503", 503), ("hang", "hang"), ("malformed", "malformed"), ("drop", "drop"))
_AUTH_STYLES = ("bearer", "x-api-key", "x-goog-api-key")
_SECRET_HEADERS = frozenset({"authorization", "x-api-key", "x-goog-api-key", "api-key", "proxy-authorization", "cookie"})
_DROP_MESSAGE = "ASGI callable returned without completing response."


@dataclass
class LogEntry:
    """One request as received; status stays 0 while it is in flight and for a dropped connection."""

    time: float  # time.monotonic() when it arrived ...
    answered_at: float = 0.0  # ... and when its response was ready (0 while in flight)
    status: int = 0
    fault: str | None = None
    auth: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: JSON | None = None
    response_id: str | None = None
    usage: JSON | None = None
    markers: tuple[str, ...] = ()
    # per choice of the answer sent: "invalid_json", "schema_break", "empty", "refusal", "repeat" or None
    flaws: tuple[str | None, ...] = ()
    batch_id: str | None = None  # a line of this batch, not a request of its own


class _Raw(Response):
    """A response sent as given pieces; when not complete the server cuts the connection after them."""

    def __init__(self, status: int, pieces: list[bytes], headers: dict[str, str], *,
                 length: int | None, complete: bool = True) -> None:
        self.status_code, self.pieces, self.complete, self.extra = status, pieces, complete, headers
        if length is not None:
            headers = {**headers, "content-length": str(length)}
        self.raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]

    def truncated(self) -> _Raw:
        data = b"".join(self.pieces)
        return _Raw(self.status_code, [data[: len(data) // 2]], self.extra, length=len(data) // 2)

    def cut(self) -> _Raw:
        data = b"".join(self.pieces)
        length = len(data) if any(k == b"content-length" for k, _ in self.raw_headers) else None
        return _Raw(self.status_code, [data[: len(data) // 2]], self.extra, length=length, complete=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        for piece in self.pieces:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        if self.complete:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def _json(status: int, obj: JSON, headers: dict[str, str] | None = None) -> _Raw:
    data = json.dumps(obj).encode()
    return _Raw(status, [data], {"content-type": "application/json", **(headers or {})}, length=len(data))


def _error(status: int, message: str | None = None, *, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> _Raw:
    return _json(status, error_body(status, message, param=param, code=code), headers)


def _drawn(draw: float, rates: dict[str, float]) -> str | None:
    """The name whose share of [0, 1), laid end to end in order, holds `draw`; None past them all."""
    edge = 0.0
    for name, rate in rates.items():
        edge += rate
        if draw < edge:
            return name
    return None


def _not_a_drop(record: logging.LogRecord) -> bool:
    """A dropped connection is a fault on purpose, not an error worth a log line."""
    return record.msg != _DROP_MESSAGE


# --- the server ---------------------------------------------------------------------------


class Simulator:
    """The app and its state. `settings` may be replaced between requests."""

    def __init__(self, settings: SimulatorSettings | None = None) -> None:
        self.settings = settings or SimulatorSettings.model_validate({})
        self.url = ""
        self.log: list[LogEntry] = []
        self.batches = BatchDesk(lambda: self.settings, self.answer_line)
        self.app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"]),
                                     Route("/v1/models", self._models, methods=["GET"]), *self.batches.routes()])
        self._lock = threading.Lock()
        self._plans: list[tuple[str, deque[Action], float | None]] = []
        self._seen: Counter[str] = Counter()
        self._meters: dict[str, tuple[tuple[Any, ...], Meter]] = {}
        self._images = ImageCache(self.settings.download_urls)
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # limits count requests in the order they arrived, as a gateway does, though their bodies
        # take different times to read: each waits for those that came before it (all in one loop)
        self._arrivals = itertools.count()
        self._next_count = 0
        self._counted: set[int] = set()
        self._waiting: dict[int, asyncio.Future[None]] = {}

    def plan(self, marker: str, statuses: Sequence[Action], retry_after_s: float | None = 0.0) -> None:
        """Answer the next requests whose markers contain `marker` with these statuses (200: normally),
        or the faults 'hang', 'malformed', 'drop', one per request, ahead of random faults."""
        with self._lock:
            self._plans.append((marker, deque(statuses), retry_after_s))

    def reset(self) -> None:
        with self._lock:
            self.log.clear()
            self._plans.clear()
            self._seen.clear()
            self._meters.clear()

    def requests(self) -> list[LogEntry]:
        with self._lock:
            return list(self.log)

    def _end_hangs(self) -> None:
        """End hung requests now (with a 503), so a shutdown need not wait for them."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopping.set)

    async def _models(self, request: Request) -> Response:
        if _auth_style(request.headers) is None:
            return _error(401)
        return _json(200, models_body())

    async def _chat(self, request: Request) -> Response:
        self._loop = asyncio.get_running_loop()
        entry = LogEntry(time=time.monotonic(), auth=_auth_style(request.headers),
                         headers={k: v for k, v in request.headers.items() if k not in _SECRET_HEADERS})
        with self._lock:
            self.log.append(entry)
        order = next(self._arrivals)
        try:
            raw = await self._respond(request, entry, order)
        finally:
            self._passed(order)
        entry.status = raw.status_code if raw.complete else 0
        entry.answered_at = time.monotonic()
        return raw

    async def _respond(self, request: Request, entry: LogEntry, order: int) -> _Raw:
        if entry.auth is None:
            return _error(401, "You didn't provide an API key.")
        try:
            body = json.loads(await request.body())
            parsed = await asyncio.to_thread(parse, body, self._images)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return _error(400, "We could not parse the JSON body of your request.")
        except Invalid as exc:
            return _error(400, exc.message, param=exc.param, code=exc.code)
        entry.body, entry.markers = parsed.logged, parsed.markers
        if (refusal := self._refusal(parsed)) is not None:
            return refusal
        k = self._count(parsed)
        entry.fault, action, retry_after = self._decide(parsed, k)
        if action == "hang":
            self._passed(order)  # those after it are counted meanwhile
            if await self._hang():
                return _error(503, "The simulator is shutting down.")
        elif isinstance(action, int) and action != 200:
            return _error(action, headers={} if retry_after is None else {"retry-after": seconds(retry_after)})
        flaws = self._flaws(parsed, k)
        texts = answer_texts(parsed, flaws)
        usage = count_usage(parsed, texts)
        charged = parsed.prompt_tokens + (
            parsed.max_tokens * parsed.n if parsed.max_tokens else usage["completion_tokens"])
        await self._turn(order)
        wait, limits = self._limit(charged, arrived=entry.time)
        self._passed(order)
        if wait > 0:
            entry.fault = "rate_limit"
            return self._refused(wait, limits)
        if self.settings.latency_s:
            await asyncio.sleep(self.settings.latency_s)
        raw, response_id = self._completion(parsed, texts, usage, limits)
        if action == "malformed":
            return raw.truncated()
        if action == "drop":
            return raw.cut()
        entry.response_id, entry.usage, entry.flaws = response_id, usage, flaws
        return raw

    def answer_line(self, body: JSON, batch_id: str, fault_500: bool = False) -> tuple[int, JSON]:
        """One line of a batch, answered as the same request online (plans and seeded faults
        included; a fault that is not a status is a 500), without the online limits: a batch
        has its own pool; `fault_500`: a 500 whatever it asks. Logged with its batch."""
        entry = LogEntry(time=time.monotonic(), auth="batch", batch_id=batch_id)
        with self._lock:
            self.log.append(entry)
        if fault_500:
            entry.status, entry.fault = 500, "batch_500"
            return 500, error_body(500, "The server had an error processing your request (simulated).")
        try:
            parsed = parse(body, self._images)
        except Invalid as exc:
            entry.status = 400
            return 400, error_body(400, exc.message, param=exc.param, code=exc.code)
        entry.body, entry.markers = parsed.logged, parsed.markers
        if (refusal := self._refusal(parsed)) is not None:
            entry.status = refusal.status_code
            return entry.status, json.loads(b"".join(refusal.pieces))
        k = self._count(parsed)
        entry.fault, action, _ = self._decide(parsed, k)
        if action is not None and action != 200:
            entry.status = action if isinstance(action, int) else 500
            return entry.status, error_body(entry.status)
        flaws = self._flaws(parsed, k)
        texts = answer_texts(parsed, flaws)
        usage = count_usage(parsed, texts)
        head = completion_head(parsed.model)
        entry.status, entry.response_id, entry.usage, entry.flaws = 200, head["id"], usage, flaws
        entry.answered_at = time.monotonic()
        return 200, completion_body(head, texts, usage)

    async def _turn(self, order: int) -> None:
        """Wait until every request that arrived before this one was counted or left."""
        if order > self._next_count:
            self._waiting[order] = asyncio.get_running_loop().create_future()
            await self._waiting[order]

    def _passed(self, order: int) -> None:
        """This request was counted or will not be: let the next in arrival order go."""
        self._waiting.pop(order, None)  # a request cut off while it waited
        if order < self._next_count or order in self._counted:
            return
        self._counted.add(order)
        while self._next_count in self._counted:
            self._counted.discard(self._next_count)
            self._next_count += 1
        if (turn := self._waiting.pop(self._next_count, None)) is not None and not turn.done():
            turn.set_result(None)

    def _refusal(self, parsed: Parsed) -> _Raw | None:
        """The 400 of a gateway that does not pass this response_format on, or None."""
        refuse, kind = self.settings.refuse_response_format, parsed.response_format
        if kind is None or refuse == "none" or (refuse == "json_schema" and kind != "json_schema"):
            return None
        return _error(400, f"Invalid parameter: 'response_format' of type '{kind}' is not supported with this model.",
                      param="response_format")

    def _count(self, parsed: Parsed) -> int:
        """How often this request was seen before: its draws differ each time."""
        with self._lock:
            k = self._seen[parsed.digest]
            self._seen[parsed.digest] += 1
        return k

    def _decide(self, parsed: Parsed, k: int) -> tuple[str | None, Action | None, float | None]:
        """(fault for the log, what to do, Retry-After): a plan first, else a seeded draw."""
        with self._lock:
            for plan in self._plans:
                marker, actions, retry_after = plan
                if any(marker in m for m in parsed.markers):
                    action = actions.popleft()
                    if not actions:
                        self._plans.remove(plan)
                    return (None if action == 200 else "plan"), action, (retry_after if action == 429 else None)
        settings = self.settings
        draw = random.Random(f"{settings.seed}:{parsed.digest}:{k}").random()
        fault = _drawn(draw, {name: getattr(settings, f"rate_{name}") for name, _ in _FAULTS})
        drawn = dict(_FAULTS).get(fault) if fault else None
        return fault, drawn, (settings.retry_after_s if drawn == 429 else None)

    def _flaws(self, parsed: Parsed, k: int) -> tuple[str | None, ...]:
        """Per choice, a seeded draw of its flaw: a structured answer not JSON, breaking the
        schema or refused; a prose answer empty, a refusal or the same for every image; or none."""
        settings, flaws = self.settings, []
        rates = ({"invalid_json": settings.rate_invalid_json, "schema_break": settings.rate_schema_break,
                  "refusal": settings.rate_refusal}
                 if parsed.schema is not None else
                 {"empty": settings.rate_empty, "refusal": settings.rate_refusal, "repeat": settings.rate_repeat})
        for i in range(parsed.n):
            flaws.append(_drawn(random.Random(f"{settings.seed}:{parsed.digest}:{k}:flaw:{i}").random(), rates))
        return tuple(flaws)

    async def _hang(self) -> bool:
        """Stay silent for hang_s; True when the server stops meanwhile."""
        try:
            await asyncio.wait_for(self._stopping.wait(), self.settings.hang_s)
        except asyncio.TimeoutError:
            return False
        return True

    def _limit(self, cost: int, arrived: float) -> tuple[float, dict[str, str]]:
        """Seconds to wait before this request fits every limit (0: counted now), and the headers.
        A refused request counts too where the settings say so, as OpenAI counts it."""
        # counted when it arrived (monotonic), as a provider's gateway counts, not after the body
        # was read and its images decoded; on the wall clock, so fixed windows are whole minutes
        now, headers = time.time() - (time.monotonic() - arrived), dict[str, str]()
        with self._lock:
            active = [(kind, meter, charge) for kind, charge in (("requests", 1), ("tokens", cost))
                      if (meter := self._meter(kind)) is not None]
            wait = max((meter.wait_s(charge, now) for _, meter, charge in active), default=0.0)
            counted = wait == 0 or (self.settings.count_refused and self.settings.limit_mode != "bucket")
            for kind, meter, charge in active:
                if counted:
                    meter.take(charge, now)
                headers |= {f"x-ratelimit-limit-{kind}": str(meter.limit),
                            f"x-ratelimit-remaining-{kind}": str(math.floor(meter.remaining(now))),
                            f"x-ratelimit-reset-{kind}": go_duration(meter.reset_s(now))}
        return wait, headers if self.settings.state_limits else {}

    def _meter(self, kind: str) -> Meter | None:
        """The meter of one limit, made anew when the settings that shape it change."""
        s = self.settings
        limit, neighbour = ((s.requests_per_minute, s.neighbour_rpm) if kind == "requests"
                            else (s.tokens_per_minute, s.neighbour_tpm))
        if limit is None:
            return None
        shape = (s.limit_mode, limit, s.window_s, neighbour)
        if kind not in self._meters or self._meters[kind][0] != shape:
            self._meters[kind] = (shape, meters.meter(s.limit_mode, limit, s.window_s, neighbour))
        return self._meters[kind][1]

    def _refused(self, wait: float, limits: dict[str, str]) -> _Raw:
        """A rate-limit 429: the wait in the message, and as the settings say in headers: whole
        seconds in Retry-After (as HTTP writes it, and as the windowed modes send it), or
        fractional seconds and retry-after-ms (the bucket, as Azure sends them)."""
        message = f"Rate limit reached (simulated). Please try again in {seconds(wait)}s."
        if not self.settings.state_limits:
            return _error(429, message)
        if self.settings.limit_mode == "bucket":
            asked = {"retry-after": seconds(wait), "retry-after-ms": str(math.ceil(wait * 1000))}
        else:
            asked = {"retry-after": str(max(1, math.ceil(wait)))}
        return _error(429, message, headers={**asked, **limits})

    def _completion(self, parsed: Parsed, texts: list[Answer], usage: JSON,
                    headers: dict[str, str]) -> tuple[_Raw, str]:
        head = completion_head(parsed.model)
        if parsed.stream:
            events = chunk_events(head, texts, usage if parsed.include_usage else None)
            return _Raw(200, events, {"content-type": "text/event-stream", "cache-control": "no-cache", **headers},
                        length=None), head["id"]
        return _json(200, completion_body(head, texts, usage), headers), head["id"]


def _auth_style(headers: Headers) -> str | None:
    bearer = headers.get("authorization", "")
    keys = {"bearer": bearer[7:].strip() if bearer[:7].lower() == "bearer " else "",
            "x-api-key": headers.get("x-api-key", "").strip(),
            "x-goog-api-key": headers.get("x-goog-api-key", "").strip()}
    return next((style for style in _AUTH_STYLES if keys[style]), None)


def _check_loopback(host: str) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the simulator serves loopback only (127.0.0.0/8, ::1, localhost), not {host!r}")


@contextmanager
def running(settings: SimulatorSettings | None = None, host: str = "127.0.0.1", port: int = 0) -> Iterator[Simulator]:
    """Run a simulator in a background thread; yields once it accepts connections, stops it on exit."""
    _check_loopback(host)
    sock = serving.bind(host, port)
    sim = Simulator(settings)
    sim.url = serving.url_of(sock, host) + "/v1"
    logging.getLogger("uvicorn.error").addFilter(_not_a_drop)
    # A short graceful shutdown: hung requests are ended by _end_hangs, anything else is cancelled.
    with serving.in_thread(sim.app, sock, log_level="warning", access_log=False, timeout_graceful_shutdown=1):
        try:
            yield sim
        finally:
            sim._end_hangs()


def serve(settings: SimulatorSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run a simulator in the foreground until interrupted (for `annotate simulate`)."""
    _check_loopback(host)
    logging.getLogger("uvicorn.error").addFilter(_not_a_drop)
    uvicorn.run(Simulator(settings).app, host=host, port=port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=1)


