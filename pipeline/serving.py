"""An ASGI app served by uvicorn from a thread of this process, on a socket bound first, for
the bundled simulator and `annotate view` (and their tests).

Owns: binding, starting, waiting until it accepts, and stopping. Never: an app.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

__all__ = ["bind", "url_of", "in_thread"]


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, so asyncio sets TCP_NODELAY on accepted connections (proto 0 skips
    # it, and Nagle then holds a response's last write for the peer's delayed ACK, 40 ms)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1" if host == "localhost" else host, port))
    sock.listen(128)
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    """http://host:port of a bound socket, an IPv6 host in brackets."""
    return f"http://{f'[{host}]' if sock.family == socket.AF_INET6 else host}:{sock.getsockname()[1]}"


@contextmanager
def in_thread(app: Any, sock: socket.socket, **config: Any) -> Iterator[None]:
    """Serve `app` on `sock` from a daemon thread until the block ends; uvicorn's other
    settings as keywords (log_level, timeout_graceful_shutdown, ...)."""
    # log_config=None: leave the app's logging be
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name=f"server:{sock.getsockname()[1]}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on port {sock.getsockname()[1]} did not start")
            time.sleep(0.005)
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
