"""The fake LLM server's vocabulary: what to do wrong with a request, and what it recorded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Fault:
    """What to do wrong with one request. Build one with the class methods.

    ``kind``: ``status`` (answer ``status`` with a protocol-shaped error body), ``malformed``
    (a broken JSON body, or a broken data line mid-stream), ``stall`` (go silent for
    ``seconds`` after ``after_chunks`` content chunks, without closing), ``slow_first_token``
    (wait ``seconds`` before the first byte), ``disconnect`` (close the socket after
    ``after_chunks`` chunks), ``truncate`` (end the stream cleanly but without its final
    event), ``stream_error`` (an in-stream error event of ``error_type``).
    """

    kind: str
    status: int = 503
    retry_after: str | None = None
    error_type: str = ""
    code: str = ""
    message: str = ""
    body: Any = None
    """An exact error body (JSON-encoded unless bytes), instead of the protocol-shaped default."""
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 1.0
    after_chunks: int = 2

    @classmethod
    def http(cls, status: int, *, retry_after: str | None = None, **kw: Any) -> Fault:
        """An HTTP error status (with ``Retry-After`` if given)."""
        return cls("status", status=status, retry_after=retry_after, **kw)

    @classmethod
    def context_overflow(cls) -> Fault:
        """A 400 "prompt too long" in each protocol's own words."""
        return cls("status", status=400, code="context_length_exceeded")

    @classmethod
    def malformed(cls, *, after_chunks: int = 2) -> Fault:
        return cls("malformed", after_chunks=after_chunks)

    @classmethod
    def stall(cls, seconds: float, *, after_chunks: int = 2) -> Fault:
        return cls("stall", seconds=seconds, after_chunks=after_chunks)

    @classmethod
    def slow_first_token(cls, seconds: float) -> Fault:
        return cls("slow_first_token", seconds=seconds)

    @classmethod
    def disconnect(cls, *, after_chunks: int = 2) -> Fault:
        return cls("disconnect", after_chunks=after_chunks)

    @classmethod
    def truncate(cls, *, after_chunks: int = 2) -> Fault:
        """End the response cleanly but early: no ``[DONE]`` / ``message_stop``."""
        return cls("truncate", after_chunks=after_chunks)

    @classmethod
    def stream_error(cls, error_type: str = "overloaded_error", message: str = "Overloaded") -> Fault:
        return cls("stream_error", error_type=error_type, message=message, after_chunks=1)


@dataclass
class RecordedRequest:
    """One request as the server saw it, with its timing (``time.monotonic()`` values)."""

    method: str
    path: str
    headers: dict[str, str]
    """Lower-cased names."""
    body: Any
    protocol: str
    stream: bool
    received_at: float
    fault: str | None = None
    first_chunk_at: float | None = None
    """When the first content chunk (or the whole non-streamed body) was written."""
    client_closed_at: float | None = None
    """When the server noticed the client hung up before the answer was complete."""

    @property
    def time_to_first_chunk(self) -> float | None:
        return None if self.first_chunk_at is None else self.first_chunk_at - self.received_at
