"""The tests' S3 API server (moto's, tests/benchmarks/s3_process.py) and a proxy in front of it
that throttles as S3 does."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from .image_host import served

if TYPE_CHECKING:  # tests/benchmarks is a mypy base of its own (pyproject.toml)
    from s3_process import ACCESS_KEY, SECRET_KEY, S3Server
else:
    from .benchmarks.s3_process import ACCESS_KEY, SECRET_KEY, S3Server

__all__ = ["ACCESS_KEY", "SECRET_KEY", "S3Server", "throttling"]


# S3's answer when a prefix gets more requests than it takes (AWS: "503 Slow Down ... reduce your
# request rate"); GCS answers 429 and 503 alike, Azure 503 ServerBusy.
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


@dataclass
class Throttle:
    """What the throttling proxy refused, by method."""

    url: str = ""
    refused: dict[str, int] = field(default_factory=dict)
    ranges: dict[str, str | None] = field(default_factory=dict)  # each GET's path: its Range header


@contextlib.contextmanager
def throttling(server: S3Server) -> Iterator[Throttle]:
    """A proxy on 127.0.0.1 in front of `server` that answers the first try of every request
    (by method, path and query) 503 SlowDown, and passes the next ones through."""
    throttle = Throttle()
    seen: set[tuple[str, str]] = set()

    async def handle(request: web.Request) -> web.StreamResponse:
        key = (request.method, request.path_qs)
        body = await request.read()
        if request.method == "GET":
            throttle.ranges[request.path_qs] = request.headers.get("Range")
        if key not in seen:
            seen.add(key)
            throttle.refused[request.method] = throttle.refused.get(request.method, 0) + 1
            return web.Response(status=503, body=SLOW_DOWN, content_type="application/xml")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with aiohttp.ClientSession() as session, session.request(
                request.method, server.url + request.path_qs, headers=headers, data=body) as reply:
            data = await reply.read()
            kept = {k: v for k, v in reply.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection")}
            return web.Response(status=reply.status, body=data, headers=kept)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    with served(app) as url:
        throttle.url = url
        yield throttle
