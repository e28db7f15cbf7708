"""A real HTTP server on 127.0.0.1 that misbehaves as image hosts do: slow, flaky with
Retry-After, redirecting, missing, serving HTML, hanging, huge, hotlink-protected, and saying
X-Robots-Tag: noai. The `image_host` fixture (conftest.py) serves it for a test."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image

__all__ = ["HUGE", "PHOTO", "ImageHost", "jpeg", "served", "serving"]

CHUNK = 64 * 1024
HUGE = 40 * 1024 * 1024


def _photo() -> bytes:
    """A 2000x1000 JPEG of noise: larger than the 64 KB an estimate reads of it."""
    buffer = io.BytesIO()
    Image.effect_noise((2000, 1000), 60).convert("RGB").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


PHOTO = _photo()


def jpeg(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, "JPEG")
    return buffer.getvalue()


@dataclass
class ImageHost:
    """What the server saw: request times per path, requests in flight at most, bytes of the huge body sent."""

    url: str = ""
    seen: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    agents: list[str] = field(default_factory=list)
    ranges: list[str] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    huge_sent: int = 0

    def times(self, path: str) -> list[float]:
        return self.seen[path]


def _app(host: ImageHost) -> web.Application:
    async def track(request: web.Request, handler: Any) -> web.StreamResponse:
        host.seen[request.path].append(time.monotonic())
        host.agents.append(request.headers.get("User-Agent", ""))
        host.ranges.append(request.headers.get("Range", ""))
        host.in_flight += 1
        host.most_in_flight = max(host.most_in_flight, host.in_flight)
        try:
            return await handler(request)  # type: ignore[no-any-return]
        finally:
            host.in_flight -= 1

    async def photo(request: web.Request) -> web.Response:
        return web.Response(body=PHOTO, content_type="image/jpeg")  # the whole file: Range is not honoured

    async def ok(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("sleep", 0)))
        return web.Response(body=jpeg(), content_type="image/jpeg")

    async def flaky(request: web.Request) -> web.Response:
        """The first ask is refused (503 or 429, as `status` says) with Retry-After: 1."""
        if len(host.times(request.path)) == 1:
            return web.Response(status=int(request.query.get("status", 503)), headers={"Retry-After": "1"})
        return web.Response(body=jpeg(), content_type="image/jpeg")

    async def down(request: web.Request) -> web.Response:
        return web.Response(status=503)

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok/moved.jpg")

    async def html(request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><html><body>Hotlinking not allowed</body></html>",
                            content_type="image/jpeg")  # a Content-Type that lies

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response(status=204)

    async def hotlink(request: web.Request) -> web.Response:
        """Served to this tool only, as hotlink protection by User-Agent does."""
        if not request.headers.get("User-Agent", "").startswith("annotate-pipeline/"):
            return web.Response(status=403)
        return web.Response(body=jpeg(), content_type="image/jpeg")

    async def noai(request: web.Request) -> web.Response:
        return web.Response(body=jpeg(), content_type="image/jpeg",
                            headers={"X-Robots-Tag": "googlebot: noindex, otherbot: noai"})

    async def huge(request: web.Request) -> web.StreamResponse:
        reply = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        if request.query.get("length"):
            reply.content_length = HUGE
        await reply.prepare(request)
        block = b"\xff" * CHUNK
        for _ in range(HUGE // CHUNK):
            await reply.write(block)
            host.huge_sent += CHUNK
        return reply

    app = web.Application(middlewares=[web.middleware(track)])
    app.add_routes([web.get("/ok/{name}", ok), web.get("/flaky/{name}", flaky), web.get("/down/{name}", down),
                    web.get("/moved/{name}", moved), web.get("/html/{name}", html), web.get("/hang/{name}", hang),
                    web.get("/noai/{name}", noai), web.get("/huge/{name}", huge),
                    web.get("/photo/{name}", photo), web.get("/hotlink/{name}", hotlink)])
    return app


@contextlib.contextmanager
def served(app: web.Application) -> Iterator[str]:
    """An aiohttp app on 127.0.0.1 (a free port), in a thread and event loop of its own; its URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


@contextlib.contextmanager
def serving() -> Iterator[ImageHost]:
    host = ImageHost()
    with served(_app(host)) as url:
        host.url = url
        yield host
