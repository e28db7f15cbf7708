"""The bundled OpenAI-compatible chat-completions server, for dry runs, demos, tests and benchmarks.

Owns: a real HTTP server on loopback (starlette + uvicorn, in a thread or in the foreground);
answers, errors, usage and SSE streams computed from the request alone; request and token
rate limits as token buckets; seeded faults (429, 5xx, hangs, malformed bodies, dropped
connections) and faults scripted per marker; a log of what it received.
Never: an HTTP client (no httpx), hosts beyond loopback, fetching image URLs, keeping API keys.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import json
import logging
import math
import random
import re
import socket
import struct
import threading
import time
import typing
import uuid
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from PIL import Image
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import tokens
from .config import SimulatorSettings, one_line

__all__ = ["LogEntry", "Simulator", "running", "serve", "settings_arguments", "settings_from_arguments"]

Action = int | Literal["hang", "malformed", "drop"]  # what a plan may script: a status or a fault
JSON = dict[str, Any]

_FAULTS: tuple[tuple[str, Action], ...] = (  # drawn in this order against the cumulative rates
    ("429", 429), ("500", 500), ("503", 503), ("hang", "hang"), ("malformed", "malformed"), ("drop", "drop"))
_AUTH_STYLES = ("bearer", "x-api-key", "x-goog-api-key")
_SECRET_HEADERS = frozenset({"authorization", "x-api-key", "x-goog-api-key", "api-key", "proxy-authorization", "cookie"})
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_RANGES = {"temperature": (0, 2), "top_p": (0, 1), "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2)}
_INT_RANGES = {"n": (1, 128), "max_tokens": (1, None), "max_completion_tokens": (1, None)}
_ERRORS: dict[int, tuple[str, str | None, str]] = {  # status -> (type, code, message), as OpenAI words them
    400: ("invalid_request_error", None, "Bad request (scripted by the simulator)."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", None, "You are not allowed to use this model."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access to it."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached (simulated). Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
_PALETTE = {
    "black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128), "red": (215, 35, 35),
    "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60), "cyan": (40, 200, 220),
    "blue": (30, 70, 210), "purple": (130, 50, 180), "pink": (240, 130, 180), "brown": (130, 80, 40),
}
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
_DROP_MESSAGE = "ASGI callable returned without completing response."
_MODEL_IDS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1-mini")


@dataclass
class LogEntry:
    """One request as received; status stays 0 while it is in flight and for a dropped connection."""

    time: float
    status: int = 0
    fault: str | None = None
    auth: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: JSON | None = None
    response_id: str | None = None
    usage: JSON | None = None
    markers: tuple[str, ...] = ()


class _Invalid(Exception):
    def __init__(self, message: str, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass(frozen=True, slots=True)
class _Image:
    width: int
    height: int
    description: str


@dataclass(frozen=True, slots=True)
class _Parsed:
    model: str
    n: int
    max_tokens: int | None
    stream: bool
    include_usage: bool
    prompt: str  # the last user message's text, for the answer
    prompt_tokens: int
    images: tuple[_Image, ...]
    markers: tuple[str, ...]
    digest: str  # of the body without stream fields: a retry is the same request
    logged: JSON


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
    kind, default_code, default_message = _ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None, f"Simulated error {status}."))
    error = {"message": message or default_message, "type": kind, "param": param, "code": code or default_code}
    return _json(status, {"error": error}, headers)


def _seconds(value: float) -> str:
    """Retry-After: fractional seconds, rounded up to the millisecond so a client never comes back early."""
    return f"{math.ceil(value * 1000) / 1000:.3f}".rstrip("0").rstrip(".")


def _go_duration(value: float) -> str:
    if value < 1:
        return f"{math.ceil(value * 1000)}ms"
    minutes, secs = divmod(value, 60)
    text = _seconds(secs) + "s"
    if minutes >= 60:
        return f"{int(minutes) // 60}h{int(minutes) % 60}m{text}"
    return f"{int(minutes)}m{text}" if minutes else text


# --- images -----------------------------------------------------------------------------


def _data_url_summary(url: str) -> str:
    head, _, payload = url.partition(",")
    return f"{head},<{len(payload) * 3 // 4} bytes>"


def _colour_name(rgb: tuple[int, int, int]) -> str:
    return min(_PALETTE, key=lambda name: sum((a - b) ** 2 for a, b in zip(rgb, _PALETTE[name])))


def _dominant(img: Image.Image) -> tuple[str, str]:
    """The palette colour most pixels of a 16x16 thumbnail are nearest to, and their mean as hex."""
    small = img.convert("RGB").resize((16, 16), Image.Resampling.BOX)
    counts: Counter[str] = Counter()
    sums: dict[str, list[int]] = {}
    for count, colour in small.getcolors(256) or []:
        rgb = typing.cast(tuple[int, int, int], colour)
        name = _colour_name(rgb)
        counts[name] += count
        total = sums.setdefault(name, [0, 0, 0])
        for i in range(3):
            total[i] += rgb[i] * count
    name, count = counts.most_common(1)[0]
    return name, "#" + "".join(f"{round(c / count):02x}" for c in sums[name])


def _decode(url: str) -> _Image:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise _Invalid("Invalid image.", None, "invalid_image")
    try:
        data = base64.b64decode(payload, validate=True)
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            img.draft("RGB", (64, 64))  # JPEG: decode at a reduced scale, the colour does not need more
            img.load()
            colour, hex_ = _dominant(img)
    except (binascii.Error, *_DECODE_ERRORS):
        raise _Invalid("Invalid image.", None, "invalid_image") from None
    return _Image(width, height, f"{width}x{height} image, mostly {colour} ({hex_})")


def _url_image(url: str) -> _Image:
    host = re.sub(r"^https?://", "", url).split("/", 1)[0]
    w, h = tokens.UNKNOWN_SIZE
    return _Image(w, h, f"an image from {host} (not fetched)")


# --- request validation -------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_options(body: JSON) -> None:
    for name, (lo, hi) in _RANGES.items():
        value = body.get(name)
        if value is not None and not (_is_number(value) and lo <= value <= hi):
            raise _Invalid(f"Invalid '{name}': expected a number from {lo} to {hi}, got {value!r}.", name)
    for name, (low, high) in _INT_RANGES.items():
        value = body.get(name)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                      and low <= value and (high is None or value <= high)):
            limit = f"an integer from {low} to {high}" if high else f"an integer >= {low}"
            raise _Invalid(f"Invalid '{name}': expected {limit}, got {value!r}.", name)
    bias = body.get("logit_bias")
    if bias is not None and not (isinstance(bias, dict) and all(
            isinstance(k, str) and re.fullmatch(r"\d+", k) and _is_number(v) and -100 <= v <= 100
            for k, v in bias.items())):
        raise _Invalid("Invalid 'logit_bias': keys must be token ids, values from -100 to 100.", "logit_bias")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise _Invalid("Invalid 'stop': expected a string or a list of at most 4 strings.", "stop")
    for name, kind in (("stream", bool), ("user", str), ("stream_options", dict)):
        if body.get(name) is not None and not isinstance(body[name], kind):
            raise _Invalid(f"Invalid '{name}': expected a {kind.__name__}.", name)
    include = (body.get("stream_options") or {}).get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise _Invalid("Invalid 'stream_options.include_usage': expected a boolean.", "stream_options.include_usage")


def _parts(i: int, message: object) -> list[tuple[str, JSON]]:
    """A message's content as (param, part) pairs; a string content is one text part."""
    where = f"messages.[{i}]"
    if not isinstance(message, dict) or message.get("role") not in _ROLES:
        raise _Invalid(f"Invalid '{where}.role': expected one of {sorted(_ROLES)}.", f"{where}.role")
    content = message.get("content")
    if isinstance(content, str) or (content is None and message["role"] == "assistant"):
        return [(f"{where}.content", {"type": "text", "text": content or ""})]
    if not isinstance(content, list) or not content:
        raise _Invalid(f"Invalid '{where}.content': expected a string or a list of parts.", f"{where}.content")
    parts = []
    for j, part in enumerate(content):
        param = f"{where}.content.[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append((param, part))
        elif kind == "image_url" and isinstance(part.get("image_url"), dict):
            url, detail = part["image_url"].get("url"), part["image_url"].get("detail", "auto")
            if not isinstance(url, str) or not url.startswith(("data:", "http://", "https://")):
                raise _Invalid("Invalid image URL.", f"{param}.image_url", "invalid_image_url")
            if detail not in ("low", "high", "auto"):
                raise _Invalid(f"Invalid '{param}.image_url.detail': expected low, high or auto.",
                               f"{param}.image_url.detail")
            parts.append((param, part))
        else:
            raise _Invalid(f"Invalid content part at '{param}'.", f"{param}.type")
    return parts


def _logged(value: Any) -> Any:
    """The body with every data: URL replaced by its size, so the log stays small."""
    if isinstance(value, dict):
        return {k: _logged(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_logged(v) for v in value]
    if isinstance(value, str) and value.startswith("data:") and ";base64," in value[:100]:
        return _data_url_summary(value)
    return value


def _digest(body: JSON) -> str:
    same = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()


# --- answers ------------------------------------------------------------------------------


def _answer_texts(parsed: _Parsed) -> list[tuple[str, str]]:
    """(content, finish_reason) per choice: deterministic from the prompt and the images."""
    prompt = " ".join(parsed.prompt.split())
    head = f'[simulated] re "{prompt[:40]}{"..." if len(prompt) > 40 else ""}":'
    many = len(parsed.images) > 1
    sentences = [f"{'Image %d: ' % (k + 1) if many else ''}{img.description}." for k, img in enumerate(parsed.images)]
    base = " ".join([head, *(sentences or ["no image given."])])
    answers = []
    for i in range(parsed.n):
        text = f"(variant {i}) {base}" if i else base
        if parsed.max_tokens is not None and tokens.text_tokens(text) > parsed.max_tokens:
            answers.append((text[: parsed.max_tokens * 4], "length"))
        else:
            answers.append((text, "stop"))
    return answers


def _usage(parsed: _Parsed, answers: list[tuple[str, str]]) -> JSON:
    completion = sum(tokens.text_tokens(text) for text, _ in answers)
    return {"prompt_tokens": parsed.prompt_tokens, "completion_tokens": completion,
            "total_tokens": parsed.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}


def _events(head: JSON, answers: list[tuple[str, str]], usage: JSON | None) -> list[bytes]:
    def event(choices: list[JSON], **extra: Any) -> bytes:
        extra = {"usage": None, **extra} if usage is not None else extra
        return b"data: " + json.dumps({**head, "choices": choices, **extra}).encode() + b"\n\n"

    events = []
    for i, (text, finish) in enumerate(answers):
        events.append(event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]))
        step = max(1, math.ceil(len(text) / 3))
        pieces = [text[k: k + step] for k in range(0, len(text), step)] or [""]
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            events.append(event([{"index": i, "delta": {"content": piece}, "logprobs": None,
                                  "finish_reason": finish if last else None}]))
    if usage is not None:
        events.append(event([], usage=usage))
    return [*events, b"data: [DONE]\n\n"]


# --- rate limits --------------------------------------------------------------------------


@dataclass
class _Bucket:
    """A per-minute limit paced per second: holds one second's worth, refills at limit/60 a second."""

    limit: int
    level: float = -1.0
    stamp: float = 0.0

    def base(self) -> float:
        return max(1.0, self.limit / 60)

    def wait_s(self, cost: int, now: float) -> float:
        if self.level < 0:
            self.level, self.stamp = self.base(), now
        rate = self.limit / 60
        self.level = min(max(self.base(), cost), self.level + (now - self.stamp) * rate)
        self.stamp = now
        return max(0.0, (cost - self.level) / rate)

    def headers(self, kind: str) -> dict[str, str]:
        return {f"x-ratelimit-limit-{kind}": str(self.limit),
                f"x-ratelimit-remaining-{kind}": str(max(0, math.floor(self.level))),
                f"x-ratelimit-reset-{kind}": _go_duration(max(0.0, self.base() - self.level) / (self.limit / 60))}


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
        self.app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"]),
                                     Route("/v1/models", self._models, methods=["GET"])])
        self._lock = threading.Lock()
        self._plans: list[tuple[str, deque[Action], float | None]] = []
        self._seen: Counter[str] = Counter()
        self._buckets: dict[str, _Bucket] = {}
        self._images: dict[str, _Image] = {}
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

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
            self._buckets.clear()

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
        return _json(200, {"object": "list", "data": [
            {"id": model, "object": "model", "created": 0, "owned_by": "simulator"} for model in _MODEL_IDS]})

    async def _chat(self, request: Request) -> Response:
        self._loop = asyncio.get_running_loop()
        entry = LogEntry(time=time.monotonic(), auth=_auth_style(request.headers),
                         headers={k: v for k, v in request.headers.items() if k not in _SECRET_HEADERS})
        with self._lock:
            self.log.append(entry)
        raw = await self._respond(request, entry)
        entry.status = raw.status_code if raw.complete else 0
        return raw

    async def _respond(self, request: Request, entry: LogEntry) -> _Raw:
        if entry.auth is None:
            return _error(401, "You didn't provide an API key.")
        try:
            body = json.loads(await request.body())
            parsed = await asyncio.to_thread(self._parse, body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return _error(400, "We could not parse the JSON body of your request.")
        except _Invalid as exc:
            return _error(400, exc.message, param=exc.param, code=exc.code)
        entry.body, entry.markers = parsed.logged, parsed.markers
        entry.fault, action, retry_after = self._decide(parsed)
        if action == "hang":
            if await self._hang():
                return _error(503, "The simulator is shutting down.")
        elif isinstance(action, int) and action != 200:
            return _error(action, headers={} if retry_after is None else {"retry-after": _seconds(retry_after)})
        answers = _answer_texts(parsed)
        usage = _usage(parsed, answers)
        charged = parsed.prompt_tokens + (
            parsed.max_tokens * parsed.n if parsed.max_tokens else usage["completion_tokens"])
        wait, limits = self._limit(charged)
        if wait > 0:
            entry.fault = "rate_limit"
            return _error(429, f"Rate limit reached (simulated). Please try again in {_seconds(wait)}s.",
                          headers={"retry-after": _seconds(wait), "retry-after-ms": str(math.ceil(wait * 1000)),
                                   **limits})
        if self.settings.latency_s:
            await asyncio.sleep(self.settings.latency_s)
        raw, response_id = self._completion(parsed, answers, usage, limits)
        if action == "malformed":
            return raw.truncated()
        if action == "drop":
            return raw.cut()
        entry.response_id, entry.usage = response_id, usage
        return raw

    def _parse(self, body: object) -> _Parsed:
        """Validate a request body and look at its images (off the event loop: Pillow decodes here)."""
        if not isinstance(body, dict):
            raise _Invalid("We could not parse the JSON body of your request.", None)
        model, messages = body.get("model"), body.get("messages")
        if not isinstance(model, str) or not model:
            raise _Invalid("you must provide a model parameter", "model")
        if not isinstance(messages, list) or not messages:
            raise _Invalid("Invalid 'messages': expected a non-empty array.", "messages")
        pairs = [(m, _parts(i, m)) for i, m in enumerate(messages)]
        _check_options(body)
        prompt_tokens, prompt, markers, images = 0, "", [], []
        for message, parts in pairs:
            user = message["role"] == "user"
            for param, part in parts:
                if part["type"] == "text":
                    prompt_tokens += tokens.text_tokens(part["text"]) + 4
                    markers += [part["text"]] if user else []
                    continue
                url, detail = part["image_url"]["url"], part["image_url"].get("detail", "auto")
                image = self._image(url, f"{param}.image_url")
                prompt_tokens += tokens.image_tokens(model, image.width, image.height, detail)
                images.append(image)
                markers.append(_data_url_summary(url) if url.startswith("data:") else url[:200])
            if user:
                prompt = " ".join(part["text"] for _, part in parts if part["type"] == "text")
        options = body.get("stream_options") or {}
        return _Parsed(model, body.get("n") or 1, body.get("max_completion_tokens") or body.get("max_tokens"),
                       bool(body.get("stream")), bool(options.get("include_usage")), prompt, prompt_tokens,
                       tuple(images), tuple(markers), _digest(body), _logged(body))

    def _image(self, url: str, param: str) -> _Image:
        if not url.startswith("data:"):
            return _url_image(url)
        key = hashlib.sha256(url.encode()).hexdigest()
        if (cached := self._images.get(key)) is not None:
            return cached
        try:
            image = _decode(url)
        except _Invalid as exc:
            raise _Invalid(exc.message, param, exc.code) from None
        with self._lock:
            if len(self._images) >= 4096:  # bound memory on long benchmark runs
                self._images.clear()
            self._images[key] = image
        return image

    def _decide(self, parsed: _Parsed) -> tuple[str | None, Action | None, float | None]:
        """(fault for the log, what to do, Retry-After): a plan first, else a seeded draw."""
        with self._lock:
            k = self._seen[parsed.digest]
            self._seen[parsed.digest] += 1
            for plan in self._plans:
                marker, actions, retry_after = plan
                if any(marker in m for m in parsed.markers):
                    action = actions.popleft()
                    if not actions:
                        self._plans.remove(plan)
                    return (None if action == 200 else "plan"), action, (retry_after if action == 429 else None)
        settings = self.settings
        draw = random.Random(f"{settings.seed}:{parsed.digest}:{k}").random()
        edge = 0.0
        for name, action in _FAULTS:
            edge += getattr(settings, f"rate_{name}")
            if draw < edge:
                return name, action, (settings.retry_after_s if action == 429 else None)
        return None, None, None

    async def _hang(self) -> bool:
        """Stay silent for hang_s; True when the server stops meanwhile."""
        try:
            await asyncio.wait_for(self._stopping.wait(), self.settings.hang_s)
        except asyncio.TimeoutError:
            return False
        return True

    def _limit(self, cost: int) -> tuple[float, dict[str, str]]:
        """Seconds to wait before this request fits both buckets (0: taken now), and the headers."""
        limits = {"requests": (self.settings.requests_per_minute, 1), "tokens": (self.settings.tokens_per_minute, cost)}
        now, wait, headers = time.monotonic(), 0.0, {}
        with self._lock:
            active = []
            for kind, (limit, charge) in limits.items():
                if limit is None:
                    continue
                if kind not in self._buckets or self._buckets[kind].limit != limit:
                    self._buckets[kind] = _Bucket(limit)
                active.append((kind, self._buckets[kind], charge))
                wait = max(wait, self._buckets[kind].wait_s(charge, now))
            for kind, bucket, charge in active:
                if wait == 0:
                    bucket.level -= charge
                headers.update(bucket.headers(kind))
        return wait, headers

    def _completion(self, parsed: _Parsed, answers: list[tuple[str, str]], usage: JSON,
                    headers: dict[str, str]) -> tuple[_Raw, str]:
        response_id = f"chatcmpl-sim-{uuid.uuid4().hex[:24]}"
        head = {"id": response_id, "object": "chat.completion", "created": int(time.time()),
                "model": parsed.model, "system_fingerprint": "fp_simulator"}
        if parsed.stream:
            events = _events({**head, "object": "chat.completion.chunk"}, answers,
                             usage if parsed.include_usage else None)
            return _Raw(200, events, {"content-type": "text/event-stream", "cache-control": "no-cache", **headers},
                        length=None), response_id
        choices = [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None, "finish_reason": finish} for i, (text, finish) in enumerate(answers)]
        body = {**head, "choices": choices, "usage": usage}
        return _json(200, body, headers), response_id


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


def _config(sim: Simulator, **kwargs: Any) -> uvicorn.Config:
    logging.getLogger("uvicorn.error").addFilter(_not_a_drop)
    # A short graceful shutdown: hung requests are ended by _end_hangs, anything else is cancelled.
    return uvicorn.Config(sim.app, log_level="warning", access_log=False, timeout_graceful_shutdown=1, **kwargs)


@contextmanager
def running(settings: SimulatorSettings | None = None, host: str = "127.0.0.1", port: int = 0) -> Iterator[Simulator]:
    """Run a simulator in a background thread; yields once it accepts connections, stops it on exit."""
    _check_loopback(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1" if host == "localhost" else host, port))  # bound first: port 0 picks a free one
    sock.listen(128)
    sim = Simulator(settings)
    bound = sock.getsockname()[1]
    sim.url = f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{bound}/v1"
    server = uvicorn.Server(_config(sim, log_config=None, lifespan="off"))  # log_config=None: leave app logging be
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"simulator:{bound}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the simulator did not start")
            time.sleep(0.005)
        yield sim
    finally:
        sim._end_hangs()
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def serve(settings: SimulatorSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run a simulator in the foreground until interrupted (for `annotate simulate`)."""
    _check_loopback(host)
    uvicorn.Server(_config(Simulator(settings), host=host, port=port)).run()


def _scalar(annotation: Any) -> type:
    """int or float out of an annotation like `Annotated[int, Gt(0)] | None`; else str, which pydantic parses."""
    while (args := typing.get_args(annotation)) and typing.get_origin(annotation) is not None:
        annotation = next(a for a in args if a is not type(None))
    return annotation if annotation in (int, float) else str


def settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per SimulatorSettings field; an absent flag keeps the field's default."""
    for name, info in SimulatorSettings.model_fields.items():
        kind = _scalar(info.annotation)
        default = "none" if info.default is None else info.default
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, metavar=kind.__name__.upper(),
                            type=kind,
                            help=f"{info.description or name.replace('_', ' ')} (default: {default})")


def settings_from_arguments(args: argparse.Namespace) -> SimulatorSettings:
    values = {name: getattr(args, name) for name in SimulatorSettings.model_fields
              if getattr(args, name, None) is not None}
    try:
        return SimulatorSettings(**values)
    except ValidationError as exc:
        raise ValueError(f"simulator settings: {one_line(exc)}") from None
