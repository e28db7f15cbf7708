"""`annotate view`: a local web page over an output directory.

Owns: the HTTP routes (the page, its JSON, thumbnails and images) and serving them. The page
loads nothing from elsewhere (its Content-Security-Policy allows this server only), and the
server listens on 127.0.0.1 unless told otherwise. Never: queries (dataset.py) or images
(pictures.py).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import serving
from .dataset import Output, Query
from .pictures import Pictures, Unavailable

__all__ = ["app", "running", "serve"]

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
_MIME = {"jpg": "image/jpeg", "png": "image/png", "gif": "image/gif", "webp": "image/webp"}
# The page and its data come from this server only: nothing it shows is sent anywhere else.
_HEADERS = {"content-security-policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                       "base-uri 'none'; frame-ancestors 'none'",
            "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


def _plain(value: Any) -> Any:
    """A row's value as JSON takes it."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(_plain(data), default=str), status, media_type="application/json",
                    headers={**_HEADERS, "cache-control": "no-store"})


def _query(request: Request) -> Query:
    given = request.query_params
    values: dict[str, Any] = {f.name: given[f.name] for f in fields(Query) if f.name in given}
    for name in ("offset", "limit"):
        if name in values:
            values[name] = int(values[name]) if values[name].isdigit() else getattr(Query(), name)
    return Query(**values)


def app(location: Path | str, host: str = "127.0.0.1") -> Starlette:
    """The viewer's routes over one output directory, for requests that name this machine (or
    `host`) as their Host: a page elsewhere cannot reach them by pointing its own name at
    127.0.0.1 (DNS rebinding)."""
    output = Output(location)
    pictures = Pictures(output.folder, output.info())

    def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=_HEADERS)

    def summary(request: Request) -> Response:
        return _json({"dir": str(location), **output.summary()})

    def rows(request: Request) -> Response:
        page = output.page(_query(request))
        pictures.learn([row["id"] for row in page["rows"]])
        return _json(page)

    def row(request: Request) -> Response:
        found = output.row(request.path_params["id"])
        return _json(found) if found else _json({"error": "no such row"}, 404)

    def thumbnail(request: Request) -> Response:
        try:
            data = pictures.thumbnail(request.path_params["id"])
        except Unavailable as exc:
            return Response(str(exc), 404, media_type="text/plain", headers=_HEADERS)
        return Response(data, media_type="image/jpeg", headers={**_HEADERS, "cache-control": "max-age=3600"})

    def image(request: Request) -> Response:
        try:
            data, suffix = pictures.sent(request.path_params["id"])
        except Unavailable as exc:
            return Response(str(exc), 404, media_type="text/plain", headers=_HEADERS)
        return Response(data, media_type=_MIME.get(suffix, "application/octet-stream"), headers=_HEADERS)

    named = ["*"] if host in ("0.0.0.0", "::") else ["127.0.0.1", "localhost", "[::1]", "::1", host]
    return Starlette(middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=named)], routes=[
        Route("/", index),
        Route("/api/summary", summary),
        Route("/api/rows", rows),
        Route("/api/row/{id:path}", row),
        Route("/thumb/{id:path}", thumbnail),
        Route("/image/{id:path}", image),
        Mount("/static", StaticFiles(directory=STATIC)),
    ])


@contextmanager
def running(location: Path | str, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """The viewer served from a thread; yields its URL (for tests and the README's screenshot)."""
    sock = serving.bind(host, port)
    with serving.in_thread(app(location, host), sock, log_level="warning", access_log=False, timeout_graceful_shutdown=1):
        yield serving.url_of(sock, host) + "/"


def serve(location: Path | str, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the viewer until interrupted."""
    sock = serving.bind(host, port)
    print(f"annotate view: {location} at {serving.url_of(sock, host)}/ (Ctrl-C to stop)", flush=True)
    uvicorn.Server(uvicorn.Config(app(location, host), log_level="warning", access_log=False)).run(sockets=[sock])

