"""A small Server-Sent-Events parser (the framing both OpenAI and Anthropic stream in).

Follows the WHATWG event-stream rules that matter for model APIs: ``field: value`` lines,
one optional space after the colon stripped, ``data`` lines joined with newlines, a blank
line dispatches, lines starting with ``:`` are comments (keep-alives). Unlike the browser
rules, an event left without its closing blank line at end of stream is still delivered:
some servers end with ``data: [DONE]`` and no blank line, and dropping it would make a
complete stream look truncated.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched event: its type (``message`` unless the server named it), data and id."""

    event: str = "message"
    data: str = ""
    id: str = ""
    retry: int | None = None


class SSEDecoder:
    """Incremental decoder: feed it lines (without line endings), it returns finished events."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._id = ""
        self._retry: int | None = None
        self._pending = False  # any field seen since the last dispatch

    def feed(self, line: str) -> SSEEvent | None:
        """Consume one line; return the event a blank line completes, else ``None``."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # comment: servers send these as keep-alives
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        self._pending = True
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        # any other field name is ignored, as the spec says
        return None

    def flush(self) -> SSEEvent | None:
        """End of stream: deliver an event the server did not close with a blank line."""
        return self._dispatch() if self._pending else None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            # The spec drops an event without data (and its type); the id persists.
            self._event, self._pending, self._retry = "", False, None
            return None
        event = SSEEvent(self._event or "message", "\n".join(self._data), self._id, self._retry)
        self._event, self._data, self._pending, self._retry = "", [], False, None
        return event


async def aiter_sse_lines(lines: AsyncIterable[str]) -> AsyncIterator[SSEEvent]:
    """Events from lines that are already split (line endings stripped)."""
    decoder = SSEDecoder()
    async for line in lines:
        event = decoder.feed(line)
        if event is not None:
            yield event
    event = decoder.flush()
    if event is not None:
        yield event


async def aiter_sse(chunks: AsyncIterable[bytes | str]) -> AsyncIterator[SSEEvent]:
    """Events from raw body chunks, e.g. ``httpx.Response.aiter_bytes()`` (preferred source).

    ``httpx.Response.aiter_lines()`` splits like ``str.splitlines`` (also on U+2028, U+2029
    and U+0085), which JSON may carry unescaped inside a string: a model answer containing
    such a character would arrive as two broken data lines. SSE ends lines only at CR, LF
    or CRLF, so this splits the raw text itself.
    """
    async for event in aiter_sse_lines(_split_lines(chunks)):
        yield event


async def _split_lines(chunks: AsyncIterable[bytes | str]) -> AsyncIterator[str]:
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span chunks
    buffer = ""
    async for chunk in chunks:
        buffer += decode.decode(chunk) if isinstance(chunk, bytes) else chunk
        # A trailing CR may be the first half of a CRLF: keep it until the next chunk says.
        while (match := _EOL.search(buffer)) and not (match.group() == "\r" and match.end() == len(buffer)):
            yield buffer[: match.start()]
            buffer = buffer[match.end() :]
    buffer += decode.decode(b"", final=True)
    if buffer.endswith("\r"):
        buffer = buffer[:-1]
        yield buffer
        return
    if buffer:
        yield buffer


_EOL = re.compile(r"\r\n|\r|\n")
