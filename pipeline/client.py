"""HTTP to an OpenAI-compatible endpoint: auth, one pooled client, retries, parsing.

Owns: the auth header styles, one aiohttp session, which failures are retried and how long to
wait, reading the API key from the variable the config names. Never: building bodies,
deciding what a row's outcome means. Only this module sees the HTTP library.

aiohttp is used directly, not through httpx: httpx's request and response layer cost 0.4 to
0.7 ms of CPU a request on top of aiohttp's (bare loops against the simulator: 1.0-1.3 ms a
row against 0.62-0.64), and a run at the provider's limits is CPU-bound on one event loop.
An event stream is read as its bytes arrive (`events`).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from .completion import Reply, assemble_chunks, error_message, parse_body
from .config import AuthStyle, EndpointConfig
from .errors import ConfigError, Rejected, RequestFailed, Retryable
from .events import event_data
from .limits import Limiter, Turn

__all__ = ["ACCOUNT_STATUSES", "AUTH_HEADERS", "TRANSPORT_ERRORS", "Client", "failure_of", "proxy_for", "read_key",
           "retry_policy"]

log = logging.getLogger(__name__)

AUTH_HEADERS: dict[AuthStyle, Callable[[str], dict[str, str]]] = {
    "bearer": lambda key: {"Authorization": f"Bearer {key}"},
    "x-api-key": lambda key: {"x-api-key": key},
    "x-goog-api-key": lambda key: {"x-goog-api-key": key},
}
# The provider's own retry set: request timeout, conflict, rate limit, and any 5xx.
_RETRIED = frozenset({408, 409, 429})
# Statuses that say the key, the account or the model is wrong: every row would fail alike.
ACCOUNT_STATUSES = frozenset({401, 403, 404})
SIMULATOR_KEY = "simulator"  # what the bundled simulator is sent when no key is set
# The longest wait a Retry-After is obeyed for: a date from a skewed clock, or a number meant
# for a human, would otherwise pause every sender for hours.
MAX_RETRY_AFTER_S = 600.0
# timeout_s bounds each wait for bytes; a whole attempt may take this many times that.
DEADLINE_FACTOR = 4
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, UnicodeError)


def _stated_limits(headers: Mapping[str, str]) -> tuple[int | None, int | None]:
    """The per-minute limits in x-ratelimit-limit-requests and -tokens, where given and sane."""
    def limit(name: str) -> int | None:
        try:
            value = int(headers.get(name, ""))
        except ValueError:
            return None
        return value if value > 0 else None

    return limit("x-ratelimit-limit-requests"), limit("x-ratelimit-limit-tokens")


def read_key(endpoint: EndpointConfig) -> str:
    """The API key from the variable the config names; ConfigError when it is unset or empty,
    unless the endpoint is the bundled simulator, which takes any key."""
    key = os.environ.get(endpoint.api_key_env, "").strip()
    if key:
        return key
    if endpoint.simulator is not None:
        return SIMULATOR_KEY
    raise ConfigError(f"endpoint.api_key_env: the variable {endpoint.api_key_env} is unset or empty")


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the provider asks us to wait, at most MAX_RETRY_AFTER_S."""
    wait = _asked_wait(headers)
    return None if wait is None else min(wait, MAX_RETRY_AFTER_S)


def _asked_wait(headers: Mapping[str, str]) -> float | None:
    """retry-after-ms, then Retry-After as seconds or as an HTTP date."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (ValueError, TypeError):
        return None  # neither seconds nor a date: fall back to our own backoff
    return max(0.0, when.timestamp() - time.time())


def _retry_after_or(fallback: Callable[[RetryCallState], float]) -> Callable[[RetryCallState], float]:
    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, Retryable) and exc.retry_after_s is not None:
            return exc.retry_after_s  # the provider knows when its window reopens; sooner buys a 429
        return fallback(state)

    return wait


def retry_policy(max_attempts: int, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> AsyncRetrying:
    return AsyncRetrying(
        retry=retry_if_exception_type(Retryable),
        stop=stop_after_attempt(max_attempts),
        wait=_retry_after_or(wait_random_exponential(multiplier=0.5, max=60)),
        before_sleep=before_sleep_log(log, logging.INFO),
        sleep=sleep,
        reraise=True,  # callers handle our RequestFailed, never tenacity's RetryError wrapper
    )


class Client:
    """One pooled HTTP client for a run. `complete(body)` returns a Reply or raises RequestFailed."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        key: str,
        pacer: Limiter,
        *,
        concurrency: int,
        max_attempts: int,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._key = key
        self._base_url = endpoint.base_url.rstrip("/")
        self._completions = self._base_url + "/chat/completions"
        self._deadline_s = endpoint.timeout_s * DEADLINE_FACTOR
        self._pacer = pacer
        self._policy = retry_policy(max_attempts, sleep)
        self._http = aiohttp.ClientSession(  # made inside the run's event loop, as aiohttp wants
            headers={**endpoint.headers, **AUTH_HEADERS[endpoint.auth](key)},
            # timeout_s bounds connecting and each wait for bytes; DEADLINE_FACTOR the whole attempt
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=endpoint.timeout_s, sock_read=endpoint.timeout_s),
            connector=aiohttp.TCPConnector(limit=concurrency),
            trace_configs=[_SENT],
        )
        self._proxy = proxy_for(self._completions)

    async def aclose(self) -> None:
        await self._http.close()

    async def complete(self, body: dict[str, Any], reserve_tokens: int) -> Reply:
        attempts = 0
        try:
            async for attempt in self._policy.copy():  # tenacity keeps per-call state on the instance
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    turn = await self._pacer.pace(reserve_tokens)
                    started = time.perf_counter()
                    reply = await self._send_once(body, turn)
        except RequestFailed as exc:
            exc.attempts = attempts
            raise
        return reply.timed((time.perf_counter() - started) * 1000, attempts)

    async def _send_once(self, body: dict[str, Any], turn: Turn) -> Reply:
        try:
            async with asyncio.timeout(self._deadline_s):  # a stream that trickles forever ends too
                return await self._attempt(body, turn)
        except TimeoutError as exc:
            raise Retryable(f"no whole answer within {self._deadline_s:.0f} s from {self._base_url}") from exc
        except RequestFailed as exc:  # before the retry log or the row sees it: gateways echo keys
            exc.args = (str(exc).replace(self._key, "***"),)
            raise

    async def _attempt(self, body: dict[str, Any], turn: Turn) -> Reply:
        try:
            async with self._http.post(self._completions, json=body, proxy=self._proxy, trace_request_ctx=turn) as resp:
                self._heard(resp.status, resp.headers)
                if resp.status >= 400:
                    raise self._failure(resp.status, resp.headers, await resp.read(), turn.epoch)
                return await _answer(resp)
        except TRANSPORT_ERRORS as exc:  # timeouts, refused and dropped connections, bad encodings
            raise Retryable(f"{type(exc).__name__} talking to {self._base_url}") from exc

    def _heard(self, status: int, headers: Mapping[str, str]) -> None:
        log.info('HTTP Request: POST %s "%d"', self._completions, status)  # one line a request, as httpx logs
        requests, tokens = _stated_limits(headers)
        if requests or tokens:
            self._pacer.lower(requests, tokens)

    def _failure(self, status: int, headers: Mapping[str, str], content: bytes, epoch: int) -> RequestFailed:
        failure = failure_of(status, headers, content)
        if isinstance(failure, Retryable) and status == 429:
            self._pacer.refused(failure.retry_after_s, epoch)
        return failure


async def _body_sent(session: aiohttp.ClientSession, context: Any, params: Any) -> None:
    """The request's Turn: a window counts it from now, as its bytes are written to the socket
    (a JSON body is one write). Not from its headers: aiohttp calls that hook before it writes
    them, and writes them with the body a turn of the event loop later (later still on a busy loop)."""
    context.trace_request_ctx.sent()


_SENT = aiohttp.TraceConfig()
_SENT.on_request_chunk_sent.append(_body_sent)
_SENT.freeze()


def proxy_for(url: str) -> str | None:
    """The proxy HTTP(S)_PROXY names for url, unless NO_PROXY spares its host; looked up once,
    not per request as aiohttp's trust_env does."""
    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


async def _answer(resp: aiohttp.ClientResponse) -> Reply:
    """The completion in a 200: an event stream read as it arrives, or one JSON body (also
    when a stream was asked for and the server answered whole)."""
    try:
        if resp.content_type == "text/event-stream":
            return await _read_stream(resp.content.iter_any())
        return parse_body(await resp.read())
    except (ValueError, TypeError, AttributeError) as exc:
        raise Retryable(f"200 with a body that is not a chat completion ({exc})", status=200) from exc


async def _read_stream(chunks: AsyncIterable[bytes]) -> Reply:
    """The chunks of a whole event stream; ValueError when it is broken or ends before [DONE]."""
    parsed: list[dict[str, Any]] = []
    async for data in event_data(chunks):
        if data.strip() == "[DONE]":
            return assemble_chunks(parsed)
        parsed.append(json.loads(data))
    raise ValueError("the event stream ended before [DONE]")


def failure_of(status: int, headers: Mapping[str, str], content: bytes) -> RequestFailed:
    """What an error answer means: Retryable (408, 409, 429, 5xx; with the wait the provider
    asks), else Rejected; with the provider's own words."""
    message = f"{status} {_provider_words(content)}".strip()
    if status in _RETRIED or status >= 500:
        return Retryable(message, status=status, retry_after_s=_retry_after(headers))
    return Rejected(message, status=status)


def _provider_words(content: bytes) -> str:
    try:
        return error_message(json.loads(content))
    except ValueError:
        return content[:200].decode("utf-8", "replace")
