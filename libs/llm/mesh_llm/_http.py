"""What the HTTP providers share: the client, per-call deadlines, and failure → ``ProviderError``.

Timeouts are enforced with ``asyncio.timeout`` around each await rather than with httpx's
read timeout alone: a read timeout cannot tell "the model has not started answering"
(``first_token_s``) from "the stream went quiet mid-answer" (``idle_s``), and the gateway
treats the two differently.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx

from mesh_llm.errors import ContextOverflow, ProviderError
from mesh_llm.model import ModelRequest, Timeouts
from mesh_llm.sse import SSEEvent, aiter_sse
from mesh_llm.tokens import count_request, count_text

T = TypeVar("T")

EXCERPT_CHARS = 300
SECRET_NAME = re.compile(r"key|auth|token|secret|signature", re.I)
_CONTEXT_MESSAGE = re.compile(
    r"context[ _-]?(length|window)|maximum context|prompt is too long|input is too long|too many (input )?tokens",
    re.I,
)


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (OpenAI, more precise) or ``Retry-After``.

    ``Retry-After`` is either delta-seconds or an HTTP-date; an unparsable value is ignored
    rather than failing the error path.
    """
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT by definition
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class Deadlines:
    """The time limits of one call: a first-token deadline, idle gaps, and the total budget."""

    def __init__(self, timeouts: Timeouts) -> None:
        self.timeouts = timeouts
        self.started = time.monotonic()
        self.first_by = self.started + timeouts.first_token_s
        self.total_by = self.started + timeouts.total_s
        self.got_token = False
        """Until true, waits run under the first-token limit; after, under the idle limit."""


class HTTPChat:
    """Base of the HTTP providers: owns (or borrows) the client and turns failures into errors."""

    provider = "http"

    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        api_key: str,
        context_window: int,
        timeouts: Timeouts | None,
        client: httpx.AsyncClient | None,
    ) -> None:
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.context_window = context_window
        self.timeouts = timeouts or Timeouts()
        self._api_key = api_key
        self._secrets = [api_key] if api_key else []
        """Values no error message may contain (subclasses add credential-bearing headers)."""
        self._client = client
        self._owns_client = client is None
        # Only connect (and pool/write) are left to httpx; reads are bounded by Deadlines.
        t = self.timeouts
        self._httpx_timeout = httpx.Timeout(connect=t.connect_s, read=t.total_s, write=t.total_s, pool=t.connect_s)

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r})"

    # --- ChatModel plumbing -------------------------------------------------------------------

    def count(self, request: ModelRequest) -> int:
        """Prompt tokens of ``request`` as this provider would bill them."""
        return count_request(self.provider, self.model, request)

    def count_output(self, text: str) -> int:
        return count_text(self.provider, self.model, text)

    async def aclose(self) -> None:
        """Close the HTTP client if this provider created it (a borrowed one is the lender's)."""
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._httpx_timeout)
        return self._client

    # --- errors -------------------------------------------------------------------------------

    def redact(self, text: str) -> str:
        """Servers echo keys back ("Incorrect API key provided: sk-..."): never pass one on."""
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def error(
        self,
        message: str,
        kind: str,
        *,
        status: int | None = None,
        retryable: bool = True,
        retry_after: float | None = None,
    ) -> ProviderError:
        return ProviderError(
            self.redact(f"{self.provider}/{self.model}: {message}"),
            kind=kind,
            provider=self.provider,
            model=self.model,
            status=status,
            retry_after=retry_after,
            retryable=retryable,
        )

    def error_fields(self, body: Any) -> tuple[str, str, str]:
        """``(type, code, message)`` of a provider's JSON error body; overridden per protocol."""
        return "", "", ""

    def status_error(self, response: httpx.Response, body: bytes) -> ProviderError:
        """Map a non-2xx answer onto the gateway's error kinds."""
        status = response.status_code
        text = body.decode("utf-8", "replace")
        try:
            err_type, code, message = self.error_fields(json.loads(text))
        except (ValueError, TypeError, AttributeError):
            err_type, code, message = "", "", ""
        excerpt = " ".join((message or text).split())[:EXCERPT_CHARS]
        what = f"HTTP {status}" + (f" {err_type}" if err_type else "") + (f": {excerpt}" if excerpt else "")
        retry_after = parse_retry_after(response.headers)
        if status == 429:
            return self.error(what, "rate_limited", status=status, retry_after=retry_after)
        if status == 529 or err_type == "overloaded_error":
            return self.error(what, "overloaded", status=status, retry_after=retry_after)
        if status >= 500:
            return self.error(what, "server_error", status=status, retry_after=retry_after)
        if status in (401, 403):
            return self.error(what, "auth", status=status, retryable=False)
        if status == 404:
            return self.error(what, "not_found", status=status, retryable=False)
        if status == 408:
            return self.error(what, "timeout", status=status, retry_after=retry_after)
        if code == "context_length_exceeded" or _CONTEXT_MESSAGE.search(message or text):
            overflow = ContextOverflow(
                self.redact(f"{self.provider}/{self.model}: {what}"), provider=self.provider, model=self.model
            )
            overflow.status = status
            return overflow
        return self.error(what, "bad_request", status=status, retryable=False)

    def stream_error(self, err_type: str, message: str) -> ProviderError:
        """An error the server reported inside a 200 stream (it cannot change the status any more)."""
        kind = {
            "overloaded_error": "overloaded",
            "rate_limit_error": "rate_limited",
            "rate_limit_exceeded": "rate_limited",
        }.get(err_type, "server_error")
        excerpt = " ".join(message.split())[:EXCERPT_CHARS]
        return self.error(f"error in stream: {err_type or 'error'}: {excerpt}", kind)

    def malformed(self, what: str, raw: str = "") -> ProviderError:
        excerpt = " ".join(raw.split())[:120]
        return self.error(f"malformed response: {what}" + (f" (got: {excerpt})" if excerpt else ""), "malformed")

    # --- transport ----------------------------------------------------------------------------

    async def within(self, awaitable: Awaitable[T], deadlines: Deadlines) -> T:
        """Await under the tighter of the phase limit (first token or idle) and the total budget."""
        now = time.monotonic()
        t = deadlines.timeouts
        first = not deadlines.got_token
        phase_by = deadlines.first_by if first else now + t.idle_s
        if deadlines.total_by <= phase_by:
            limit_by, kind, what = deadlines.total_by, "timeout", f"no complete answer within {t.total_s:g}s"
        elif first:
            limit_by, kind, what = phase_by, "timeout", f"no first token within {t.first_token_s:g}s"
        else:
            limit_by, kind, what = phase_by, "stalled", f"no data for more than {t.idle_s:g}s mid-answer"
        try:
            async with asyncio.timeout(max(0.0, limit_by - now)) as cm:
                return await awaitable
        except TimeoutError:
            if cm.expired():
                raise self.error(what, kind) from None
            raise
        except httpx.TimeoutException as exc:  # httpx's own backstop read/write/pool timeouts
            if isinstance(exc, httpx.ConnectTimeout):
                raise self.error(f"connect timeout: {exc}", "connection") from None
            raise self.error(f"{type(exc).__name__}: {exc}", "timeout") from None
        except httpx.ConnectError as exc:
            raise self.error(f"cannot connect: {exc}", "connection") from None
        except httpx.TransportError as exc:
            # A reset or a peer closing mid-body: the answer is lost, a new attempt may work.
            raise self.error(f"connection lost: {type(exc).__name__}: {exc}", "connection") from None

    async def open(
        self,
        path: str,
        payload: dict[str, Any],
        headers: dict[str, str],
        deadlines: Deadlines,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        """POST ``payload``; return the (streaming) 2xx response or raise the mapped error."""
        client = self.client()
        request = client.build_request(
            "POST", self.base_url + path, json=payload, headers=headers, params=params, timeout=self._httpx_timeout
        )
        response = await self.within(client.send(request, stream=True), deadlines)
        if response.is_success:
            return response
        deadlines.got_token = True  # the server answered: the rest of an error page is "idle" time
        try:
            body = await self.read_body(response, deadlines, limit=64_000)
        finally:
            await response.aclose()
        raise self.status_error(response, body)

    async def read_body(self, response: httpx.Response, deadlines: Deadlines, limit: int | None = None) -> bytes:
        """The whole body, each chunk under the current limit (a non-streamed answer can stall too)."""
        parts: list[bytes] = []
        size = 0
        chunks = response.aiter_bytes()
        while True:
            try:
                chunk = await self.within(anext(chunks), deadlines)
            except StopAsyncIteration:
                break
            parts.append(chunk)
            size += len(chunk)
            if limit is not None and size >= limit:  # an error page: the excerpt is all we need
                break
        return b"".join(parts)

    async def events(self, response: httpx.Response, deadlines: Deadlines) -> AsyncIterator[SSEEvent]:
        """SSE events of ``response``, each awaited under the current limit.

        The caller sets ``deadlines.got_token`` when an event carried content, so that events
        a server sends before the model produced anything (Anthropic's ``message_start``,
        ``ping``) run under the first-token limit rather than the shorter idle one.
        """
        source = aiter_sse(response.aiter_bytes())
        while True:
            try:
                event = await self.within(anext(source), deadlines)
            except StopAsyncIteration:
                return
            yield event

    def usage_or_count(
        self, request: ModelRequest, input_tokens: Any, output_tokens: Any, produced: str
    ) -> tuple[int, int]:
        """Token counts the server reported, or our own count when it omitted them.

        A call that produced text is never billed as 0 output tokens: some OpenAI-compatible
        servers omit usage (or send zeros) and budgets must not treat the call as free.
        """
        inp = input_tokens if isinstance(input_tokens, int) and input_tokens > 0 else self.count(request)
        out = output_tokens if isinstance(output_tokens, int) and output_tokens > 0 else 0
        if out == 0 and produced:
            out = self.count_output(produced)
        return inp, out


def loads_object(raw: str) -> dict[str, Any] | None:
    """``raw`` as a JSON object, or ``None`` if it is not one."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
