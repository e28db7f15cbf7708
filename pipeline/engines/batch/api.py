"""The OpenAI-dialect Batch API of one endpoint: files and batches over HTTP.

Owns: uploading a batch file, creating, reading, listing and cancelling batches, reading and
deleting files; retries of what the provider answers 408, 409, 429 or 5xx (with its
Retry-After) and of dropped connections, as online requests are retried. Never: what a shard
holds or what its answers mean.

An upload or a creation whose answer was lost may have happened: `upload` and `create` look for
what they would make (the file by its name, the batch by its metadata) before making it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from ...client import AUTH_HEADERS, TRANSPORT_ERRORS, failure_of, proxy_for, retry_policy
from ...config import EndpointConfig
from ...errors import Rejected, Retryable

__all__ = ["BatchApi", "LINE_URL"]

log = logging.getLogger(__name__)

LINE_URL = "/v1/chat/completions"  # what each line of a batch file asks
PAGE = 100  # batches a page of the list holds at most (OpenAI's largest)
LOOK_BACK_S = 3600.0
T = TypeVar("T")  # a batch looked for by its metadata was created after its shard was planned, less this


class BatchApi:
    """Made inside the event loop it is used from."""

    def __init__(self, endpoint: EndpointConfig, key: str, max_attempts: int) -> None:
        self._base = endpoint.base_url.rstrip("/")
        self._key = key
        self._policy = retry_policy(max_attempts)
        self._http = aiohttp.ClientSession(
            headers={**endpoint.headers, **AUTH_HEADERS[endpoint.auth](key)},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=endpoint.timeout_s, sock_read=endpoint.timeout_s))
        self._proxy = proxy_for(self._base)

    async def aclose(self) -> None:
        await self._http.close()

    async def _call(self, method: str, path: str, **kwargs: Any) -> bytes:
        """One call, retried as online requests are; its body."""
        async for attempt in self._policy.copy():
            with attempt:
                return await self._once(method, path, **kwargs)
        raise AssertionError("unreachable: the retry policy reraises")

    async def _once(self, method: str, path: str, **kwargs: Any) -> bytes:
        url = self._base + path
        try:
            async with self._http.request(method, url, proxy=self._proxy, **kwargs) as resp:
                content = await resp.read()
        except TRANSPORT_ERRORS as exc:
            raise Retryable(f"{type(exc).__name__} talking to {self._base}") from exc
        log.info('HTTP Request: %s %s "%d"', method, url, resp.status)
        if resp.status >= 400:
            failure = failure_of(resp.status, resp.headers, content)
            failure.args = (f"{method} {path}: {failure}".replace(self._key, "***"),)
            raise failure
        return content

    async def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return _object(await self._call(method, path, **kwargs), f"{method} {path}")

    async def _made_once(self, look: Callable[[], Awaitable[T | None]], make: Callable[[], Awaitable[T]]) -> T:
        """What `make` makes, unless `look` finds it made already: looked for before the first
        attempt and before each retry, as an attempt whose answer was lost may have made it."""
        async for attempt in self._policy.copy():
            with attempt:
                if (found := await look()) is not None:
                    return found
                return await make()
        raise AssertionError("unreachable: the retry policy reraises")

    async def upload(self, path: Path, name: str) -> str:
        """The id of the batch file `name` holding `path`'s bytes: the one uploaded before, if any."""
        size = path.stat().st_size

        async def make() -> str:
            form = aiohttp.FormData()  # made anew for each attempt: a form is read once
            form.add_field("purpose", "batch")
            form.add_field("file", path.read_bytes(), filename=name, content_type="application/jsonl")
            return _id(_object(await self._once("POST", "/files", data=form), "POST /files"))

        return await self._made_once(lambda: self._file_named(name, size), make)

    async def _file_named(self, name: str, size: int) -> str | None:
        try:
            async for file in self._pages("/files", {"purpose": "batch"}):
                if file.get("filename") == name and file.get("bytes") == size:
                    return _id(file)
        except Rejected as exc:  # a provider that does not list files: nothing to find
            log.info("cannot look for an earlier upload of %s (%s)", name, exc)
        return None

    async def create(self, file_id: str, metadata: Mapping[str, str], planned_at: float) -> dict[str, Any]:
        """The batch of `file_id`: the one made before with these metadata, if any."""
        body = {"input_file_id": file_id, "endpoint": LINE_URL, "completion_window": "24h", "metadata": dict(metadata)}

        async def make() -> dict[str, Any]:
            made = _object(await self._once("POST", "/batches", json=body), "POST /batches")
            _id(made)
            return made

        return await self._made_once(lambda: self.find(metadata, planned_at), make)

    async def find(self, metadata: Mapping[str, str], planned_at: float) -> dict[str, Any] | None:
        """The newest batch with these metadata, created since its shard was planned."""
        async for batch in self._pages("/batches", {"limit": PAGE}):
            if (batch.get("created_at") or 0) < planned_at - LOOK_BACK_S:
                return None  # newest first: the rest are older still
            if all((batch.get("metadata") or {}).get(k) == v for k, v in metadata.items()):
                return batch
        return None

    async def _pages(self, path: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        after: str | None = None
        while True:
            page = await self._json("GET", path, params={**params, **({"after": after} if after else {})})
            data = page.get("data") or []
            for item in data:
                yield item
            if not page.get("has_more") or not data:
                return
            after = _id(data[-1])

    async def get(self, batch_id: str) -> dict[str, Any]:
        return await self._json("GET", f"/batches/{batch_id}")

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self._json("POST", f"/batches/{batch_id}/cancel")

    async def content(self, file_id: str) -> bytes:
        return await self._call("GET", f"/files/{file_id}/content")

    async def delete(self, file_id: str) -> None:
        """Delete a file; one already gone is fine."""
        try:
            await self._call("DELETE", f"/files/{file_id}")
        except Rejected as exc:
            if exc.status != 404:
                raise


def _object(content: bytes, what: str) -> dict[str, Any]:
    """A JSON object the provider answered; Retryable when it is not one (a proxy's page)."""
    try:
        found = json.loads(content)
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise Retryable(f"{what}: the answer is not a JSON object: {content[:200]!r}")
    return found


def _id(obj: Mapping[str, Any]) -> str:
    if not isinstance(obj.get("id"), str):
        raise Retryable(f"an answer without an id: {str(obj)[:200]}")
    return str(obj["id"])
