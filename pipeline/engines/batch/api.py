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
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from ...client import AUTH_HEADERS, TRANSPORT_ERRORS, failure_of, proxy_for, retry_policy
from ...config import EndpointConfig
from ...errors import Rejected, Retryable

__all__ = ["BatchApi", "LINE_URL"]

log = logging.getLogger(__name__)

LINE_URL = "/v1/chat/completions"  # what each line of a batch file asks
PAGE = 100  # batches a page of the list holds at most (OpenAI's largest)
LOOK_BACK_S = 3600.0  # a batch looked for by its metadata was created after its shard was planned, less this


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
        found = json.loads(await self._call(method, path, **kwargs))
        if not isinstance(found, dict):
            raise Retryable(f"{method} {path}: the answer is not a JSON object")
        return found

    async def upload(self, path: Path, name: str) -> str:
        """The id of the batch file `name` holding `path`'s bytes: the one uploaded before, if any."""
        if (found := await self._file_named(name, path.stat().st_size)) is not None:
            return found

        def form() -> aiohttp.FormData:  # made anew for each attempt: a form is read once
            data = aiohttp.FormData()
            data.add_field("purpose", "batch")
            data.add_field("file", path.read_bytes(), filename=name, content_type="application/jsonl")
            return data

        async for attempt in self._policy.copy():
            with attempt:
                if attempt.retry_state.attempt_number > 1 and (found := await self._file_named(name, path.stat().st_size)):
                    return found  # the attempt before was made, though its answer was lost
                return str(json.loads(await self._once("POST", "/files", data=form()))["id"])
        raise AssertionError("unreachable: the retry policy reraises")

    async def _file_named(self, name: str, size: int) -> str | None:
        async for file in self._pages("/files", {"purpose": "batch", "limit": 10_000}):
            if file.get("filename") == name and file.get("bytes") == size:
                return str(file["id"])
        return None

    async def create(self, file_id: str, metadata: Mapping[str, str], planned_at: float) -> dict[str, Any]:
        """The batch of `file_id`: the one made before with these metadata, if any."""
        if (found := await self.find(metadata, planned_at)) is not None:
            return found
        body = {"input_file_id": file_id, "endpoint": LINE_URL, "completion_window": "24h", "metadata": dict(metadata)}
        return await self._json("POST", "/batches", json=body)

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
            after = str(data[-1]["id"])

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
