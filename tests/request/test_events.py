"""Event streams read as their bytes arrive: split anywhere, with every line ending the standard
allows, and from a real server on 127.0.0.1 that holds its stream open until the client has read
the first event."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pipeline.client import Client
from pipeline.config import EndpointConfig
from pipeline.errors import Retryable
from pipeline.events import event_data
from pipeline.limits import LocalLimiter

# a byte-order mark, a comment, CRLF, lone CR and LF endings, two data lines, other fields, a
# field with no colon, data with no space after the colon, and an event left open at the end
STREAM = (b'\xef\xbb\xbfdata: {"a": 1}\r\n: keep-alive\r\n\r\ndata: one\rdata: two\r\revent: x\nid: 7\ndata\n\n'
          b'data:{"b":2}\n\ndata: [DONE]\n\ndata: never dispatched\n')
EVENTS = ['{"a": 1}', "one\ntwo", "", '{"b":2}', "[DONE]"]


async def _given(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def _read(parts: Iterable[bytes]) -> list[str]:
    async def collect() -> list[str]:
        return [data async for data in event_data(_given(parts))]
    return asyncio.run(collect())


def test_a_stream_split_anywhere_gives_the_same_events() -> None:
    assert _read([STREAM]) == EVENTS
    for cut in range(len(STREAM) + 1):
        assert _read([STREAM[:cut], STREAM[cut:]]) == EVENTS, cut
    assert _read([STREAM[i:i + 1] for i in range(len(STREAM))]) == EVENTS
    assert _read([b"data: last\r", b"\r"]) == ["last"]  # a CR that ends the stream ends its line


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _serving(handler: Handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/v1"


def _chunk(content: str, **more: Any) -> bytes:
    delta = {"index": 0, "delta": {"content": content}, **more}
    return f"data: {json.dumps({'id': 'c', 'model': 'm', 'choices': [delta]})}\r\n\r\n".encode()


def test_each_event_is_read_while_the_server_still_holds_the_stream_open() -> None:
    async def scenario() -> list[str]:
        first_read = asyncio.Event()

        async def stream(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(_chunk("first"))
            await asyncio.wait_for(first_read.wait(), 10)  # the rest only once the client read it
            await resp.write(_chunk("second") + b"data: [DONE]\n\n")
            return resp

        runner, url = await _serving(stream)
        seen = []
        try:
            async with aiohttp.ClientSession() as http, http.post(f"{url}/chat/completions") as resp:
                async with asyncio.timeout(5):
                    async for data in event_data(resp.content.iter_any()):
                        seen.append(data)
                        first_read.set()
        finally:
            await runner.cleanup()
        return seen

    seen = asyncio.run(scenario())
    assert [json.loads(d)["choices"][0]["delta"]["content"] for d in seen[:2]] == ["first", "second"]
    assert seen[2] == "[DONE]"


def _complete(handler: Handler, body: dict[str, Any]) -> Any:
    async def scenario() -> Any:
        runner, url = await _serving(handler)
        client = Client(EndpointConfig(base_url=url), "k", LocalLimiter(concurrency=1), concurrency=1,
                        max_attempts=2, sleep=lambda _: asyncio.sleep(0))
        try:
            return await client.complete(body, 10)
        finally:
            await client.aclose()
            await runner.cleanup()
    return asyncio.run(scenario())


STREAMED = {"model": "m", "messages": [], "stream": True}


def test_a_stream_with_lone_cr_line_endings_is_assembled() -> None:
    async def answer(request: web.Request) -> web.Response:
        body = (_chunk("a cat") + _chunk(" sleeps", finish_reason="stop") + b"data: [DONE]\r\n\r\n").replace(b"\r\n", b"\r")
        return web.Response(body=body, content_type="text/event-stream")

    reply = _complete(answer, STREAMED)
    assert reply.answers == ("a cat sleeps",) and reply.finish_reason == "stop"


def test_a_whole_json_answer_to_a_stream_request_is_taken_as_it_is() -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"id": "c", "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "a dog"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})

    reply = _complete(answer, STREAMED)
    assert reply.answers == ("a dog",) and reply.usage is not None


def test_a_stream_cut_before_done_is_retried_then_fails_saying_so() -> None:
    asked = []

    async def cut(request: web.Request) -> web.Response:
        asked.append(1)
        return web.Response(body=_chunk("half an answ"), content_type="text/event-stream")

    with pytest.raises(Retryable, match="ended before \\[DONE\\]"):
        _complete(cut, STREAMED)
    assert len(asked) == 2
