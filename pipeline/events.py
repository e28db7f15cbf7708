"""Server-sent events (`text/event-stream`) read as their bytes arrive.

Owns: the event-stream format of the HTML standard (section 9.2.6) as far as a chat-completion
stream uses it: lines, `data` fields, dispatch on an empty line. Never: HTTP, what the data means.
Written here because the parsers on PyPI come bound to an HTTP client (httpx-sse, aiohttp-sse-
client) and this one reads the chunks aiohttp gives.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


async def event_data(chunks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """The data of each event, in order, as soon as its closing empty line has arrived.

    Lines end in CRLF, LF or CR (a CR at the end of a chunk waits for the next, as it may open a
    CRLF); an event's `data` lines are joined with newlines; comments (`:`) and other fields are
    skipped; an event left open when the stream ends is dropped, as the standard says."""
    pending, first = b"", True  # the first line may open with a byte-order mark
    data: list[str] = []
    async for chunk in chunks:
        pending += chunk
        cut = len(pending) - pending.endswith(b"\r")
        *lines, rest = _LINE_END.split(pending[:cut])
        pending = rest + pending[cut:]
        if lines and first:
            lines[0], first = lines[0].removeprefix(_BOM), False
        for line in lines:
            if (event := _line(line, data)) is not None:
                yield event
    if pending.endswith(b"\r") and (event := _line(pending[:-1], data)) is not None:
        yield event  # the stream's last line ended in a CR


def _line(line: bytes, data: list[str]) -> str | None:
    """Take one line into the event being read; at an empty line, the event's data (None when
    it had none) and a new event begins."""
    if line:
        name, _, value = line.partition(b":")
        if name == b"data":
            data.append(value.removeprefix(b" ").decode("utf-8", "replace"))
        return None
    event = "\n".join(data) if data else None
    data.clear()
    return event
