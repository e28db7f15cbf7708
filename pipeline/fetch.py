"""Remote images -> bytes: one polite HTTP pool for a run's http(s) image references, and
reads of its object-store ones (s3://, gs://, az://), many at once without blocking.

Owns: fetching an image URL with a few requests at once per host, retrying 429s, 5xx answers,
timeouts and dropped connections (waiting as Retry-After says), following redirects, a
User-Agent that names the tool, stopping at input.fetch.max_bytes, and X-Robots-Tag's noai.
A failure is a RowInputError naming its cause; transient ones stay retryable for the next
run. Never: decoding the bytes (images.py does, by content, whatever Content-Type said), or
the provider's endpoint.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from . import __version__, objects
from .config import FetchConfig
from .errors import RowInputError
from .images import is_remote
from .manifest import ImageRef

__all__ = ["Fetcher", "fetch_rows", "fetch_heads", "user_agent"]

T = TypeVar("T")
_CHUNK = 1 << 16
_LONGEST_WAIT_S = 120.0  # a Retry-After beyond this ends the tries: the next run asks again
_NO_AI = {"noai", "noimageai"}


def user_agent(contact: str | None) -> str:
    return f"annotate-pipeline/{__version__} (+{contact})" if contact else f"annotate-pipeline/{__version__}"


class _Transient(Exception):
    """A failure worth another try: a 429, a 5xx, a timeout, a dropped connection."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _wait(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, _Transient) and exc.retry_after is not None:
        return exc.retry_after
    return wait_exponential_jitter(multiplier=0.5, max=10)(state)


def _says_noai(values: Sequence[str]) -> bool:
    """X-Robots-Tag directives, comma-separated, each maybe for one bot ('otherbot: noai')."""
    directives = (d.rsplit(":", 1)[-1].strip().lower() for value in values for d in value.split(","))
    return any(d in _NO_AI for d in directives)


class Fetcher:
    """Made inside the event loop it fetches from (its connection pool opens there)."""

    def __init__(self, cfg: FetchConfig) -> None:
        self._cfg = cfg
        self._session: aiohttp.ClientSession | None = None
        self._hosts: dict[str, asyncio.Semaphore] = {}

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch_all(self, refs: Sequence[ImageRef], http: bool = True) -> Mapping[str, bytes]:
        """The bytes of each object-store reference, and of each http(s) one when `http`, fetched
        at once; RowInputError for the first that fails (the others are let finish: they are not
        wasted on a retried row)."""
        urls = list(dict.fromkeys(r for r in refs if objects.is_object_url(r) or http and is_remote(r)))
        found = await asyncio.gather(*map(self.fetch, urls), return_exceptions=True)
        for result in found:
            if isinstance(result, BaseException):
                raise result
        return dict(zip(urls, found))  # type: ignore[arg-type]

    async def fetch(self, url: str, first: int | None = None) -> bytes:
        """The image's bytes; with `first`, only its first bytes (a ranged GET, cut short there
        if the server sends the whole file anyway)."""
        if objects.is_object_url(url):
            return await self._object(url, first)
        tries = AsyncRetrying(stop=stop_after_attempt(self._cfg.max_attempts), wait=_wait, reraise=True,
                              retry=retry_if_exception_type(_Transient))
        try:
            async for attempt in tries:
                with attempt:
                    return await self._once(url, first)
        except _Transient as exc:
            attempts = tries.statistics.get("attempt_number", 1)
            raise RowInputError(f"{url}: {exc} ({attempts} attempt{'s' if attempts > 1 else ''})",
                                retryable=True) from None
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _object(self, url: str, first: int | None) -> bytes:
        """An object's bytes (the store's client retries its throttling answers itself)."""
        gate = self._hosts.setdefault(objects.bucket_of(url), asyncio.Semaphore(self._cfg.per_bucket))
        async with gate:
            try:
                return await objects.read_async(url, first, self._cfg.max_bytes)
            except objects.NotFound:
                raise RowInputError(f"missing object {url}") from None
            except objects.TooLarge as exc:
                raise RowInputError(f"{exc}, over input.fetch.max_bytes ({self._cfg.max_bytes})") from None
            except OSError as exc:  # after the client's own retries: the next run tries again
                raise RowInputError(str(exc), retryable=True) from None

    def _pool(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._cfg.timeout_s),
                headers={"User-Agent": user_agent(self._cfg.user_agent), "Accept": "image/*,*/*;q=0.5"},
                connector=aiohttp.TCPConnector(limit=0))  # per host: the semaphores
        return self._session

    async def _once(self, url: str, first: int | None) -> bytes:
        host = urlsplit(url).hostname or ""
        gate = self._hosts.setdefault(host, asyncio.Semaphore(self._cfg.per_host))
        ranged = {"Range": f"bytes=0-{first - 1}"} if first else None
        async with gate:
            try:
                async with self._pool().get(url, allow_redirects=True, max_redirects=10, headers=ranged) as reply:
                    return await self._body(url, reply, first)
            except asyncio.TimeoutError:
                raise _Transient(f"no answer within input.fetch.timeout_s ({self._cfg.timeout_s:g} s)") from None
            except aiohttp.TooManyRedirects:
                raise RowInputError(f"{url}: more than 10 redirects") from None
            except (aiohttp.InvalidURL, ValueError) as exc:
                raise RowInputError(f"{url}: not a URL that can be fetched ({exc})") from None
            except aiohttp.ClientError as exc:  # refused, reset, DNS, a body cut short
                raise _Transient(f"{type(exc).__name__}: {exc}") from None

    async def _body(self, url: str, reply: aiohttp.ClientResponse, first: int | None) -> bytes:
        cfg = self._cfg
        if reply.status == 429 or reply.status >= 500:
            wait = _retry_after(reply.headers.get("Retry-After"))
            if wait is not None and wait > _LONGEST_WAIT_S:
                raise RowInputError(f"{url}: HTTP {reply.status}, Retry-After {wait:.0f} s", retryable=True)
            raise _Transient(f"HTTP {reply.status} {reply.reason or ''}".rstrip(), wait)
        if reply.status >= 400:
            raise RowInputError(f"{url}: HTTP {reply.status} {reply.reason or ''}".rstrip())
        if cfg.respect_robots and _says_noai(reply.headers.getall("X-Robots-Tag", [])):
            raise RowInputError(f"{url}: X-Robots-Tag says noai (set input.fetch.respect_robots: false to fetch it)")
        if reply.content_length is not None and reply.content_length > cfg.max_bytes and not first:
            raise RowInputError(f"{url}: {reply.content_length} bytes, over input.fetch.max_bytes ({cfg.max_bytes})")
        body = bytearray()
        async for chunk in reply.content.iter_chunked(_CHUNK):
            body += chunk
            if first and len(body) >= first:
                return bytes(body[:first])
            if len(body) > cfg.max_bytes:
                raise RowInputError(f"{url}: longer than input.fetch.max_bytes ({cfg.max_bytes}); stopped reading")
        return bytes(body)



def _at_once(cfg: FetchConfig, calls: Callable[[Fetcher], list[Awaitable[T]]]) -> list[T | RowInputError]:
    """Run `calls` at once through one pool, for callers without an event loop (a Ray Data
    task, the estimate); each result or the RowInputError it ended in."""
    async def every() -> list[T | BaseException]:
        fetcher = Fetcher(cfg)
        try:
            return await asyncio.gather(*calls(fetcher), return_exceptions=True)
        finally:
            await fetcher.aclose()

    found = asyncio.run(every())
    for result in found:
        if isinstance(result, BaseException) and not isinstance(result, RowInputError):
            raise result
    return found  # type: ignore[return-value]


def fetch_rows(cfg: FetchConfig, rows: Sequence[Sequence[ImageRef]],
               http: bool = True) -> list[Mapping[str, bytes] | RowInputError]:
    """Each row's object-store images (and http(s) ones when `http`), or the error that row ends with."""
    return _at_once(cfg, lambda fetcher: [fetcher.fetch_all(refs, http) for refs in rows])


def fetch_heads(cfg: FetchConfig, urls: Sequence[str], first: int) -> dict[str, bytes | RowInputError]:
    """The first bytes of each URL, or the error fetching it ends in."""
    return dict(zip(urls, _at_once(cfg, lambda fetcher: [fetcher.fetch(url, first) for url in urls])))
