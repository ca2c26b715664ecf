"""The HTTP layer under remote endpoints (MCP: ``remote.py``; A2A: ``remote_a2a.py``): credentials,
response bounds, and what happened to each request, as the SDKs themselves would not tell.

The SDK's streamable-HTTP client turns most HTTP trouble into one of a few JSON-RPC error codes
(an HTTP 401 and a 500 both become "Server returned an error response"), and it lets a network
exception escape from a request's POST task, where it ends the whole session: every other call in
flight on it fails too. So the ``httpx2`` transport the SDK is handed (``BoundedTransport``) does
three things below the SDK:

- It notes, for the one JSON-RPC request a caller is waiting for, what really happened
  (``Exchange``: did it reach the transport, its HTTP status, the network error, a cut-off). The
  caller puts an ``Exchange`` in a context variable; the SDK copies the sender's context into the
  task that POSTs the message, so the transport finds it there. Only the POST whose JSON-RPC
  method matches, first one only, is noted: the standalone GET stream, notifications (e.g. the
  SDK's cancellation) and the session's DELETE inherit the same context and are left out.
- It never raises a network error to the SDK. A request that could not be sent gets a stand-in
  HTTP 502, and a body that breaks off raises ``ResponseCut``, an ``httpx2.StreamError``: the SDK
  fails just that request (PARSE_ERROR for a JSON body, CONNECTION_CLOSED for an SSE stream) and
  the session lives on. The ``Exchange`` keeps the real cause.
- It counts each response body's bytes as they stream and stops reading past ``max_bytes``
  (``ResponseCut`` again), so a server cannot make this process hold more than that, and asks for
  ``identity`` encoding so the count is the size of what is held (no decompression bombs).

The MCP SDK speaks ``httpx2``, the a2a SDK ``httpx``: the two libraries share their transport API,
so one implementation (``_Layer``, ``_BoundedBody``) serves both, bound to each library by a few
class attributes (``BoundedTransport``, ``HttpxBoundedTransport``). An A2A endpoint notes its
requests the same way, with ``Exchange("*")``: each of its requests runs in its caller's task, one
at a time, so the first request sent in that context is the one.

Credentials live here too, as the transport's own objects (not ``httpx2.Auth``, whose failures
would escape as above). A bearer token is read from its mounted file when the transport is built
(at each connect) and once more after an HTTP 401, then the request is sent again: a rotated
secret is picked up without a failed call. OAuth client credentials (RFC 6749 4.4, the client
authenticating with HTTP Basic) fetch a token before it expires and once more after a 401. Tokens
stay in private attributes of objects whose repr names only the secret's file.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

import anyio
import httpx
import httpx2

from mesh_tool_executor.errors import ToolExecutorError

log = logging.getLogger("mesh.tool-executor.remote")

_TOKEN_BODY_BYTES = 64 * 1024  # a token response is a few hundred bytes
_TOKEN_EARLY_S = 30.0  # fetch a new token this long before the old one expires (or at half its life)
_TOKEN_READ_S = 30.0
_TOKEN_HEADERS = {"accept": "application/json", "accept-encoding": "identity"}
_ERROR_CODE = re.compile(r"^[a-z_]{1,40}$")  # an OAuth "error" value, safe to show


@dataclass
class Exchange:
    """What the HTTP layer saw of one JSON-RPC request (set by the caller in ``EXCHANGE``)."""

    method: str  # the JSON-RPC method to note, e.g. "tools/call"; "*": the first request of any kind
    posted: bool = False  # the request reached this transport (before that it never left this process)
    status: int | None = None  # the HTTP status of the (last) response
    error: BaseException | None = None  # the network error of its POST, before or during the body
    too_large: bool = False  # its response body went past max_bytes and was cut off
    auth_error: str | None = None  # credentials could not be had (unreadable secret, token endpoint)


EXCHANGE: ContextVar[Exchange | None] = ContextVar("mesh_remote_exchange", default=None)


class CredentialsError(ToolExecutorError):
    """A secret could not be read or a token could not be had; the message names no secret."""


class ResponseCut(ToolExecutorError, httpx2.StreamError):
    """A response body this layer stopped reading. A StreamError so that the SDK fails only the request."""


def describe(exc: BaseException) -> str:
    """One line on a network error, from the most telling exception in its chain."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted ({seen.verify_message or seen.reason})"
        if isinstance(seen, ssl.SSLError):
            return f"TLS handshake failed ({seen.reason or seen})"
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, socket.gaierror):
            return "host name not resolved"
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, httpx2.ConnectTimeout | httpx2.PoolTimeout | httpx.ConnectTimeout | httpx.PoolTimeout):
        return "connect timed out"
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_secret(directory: Path | None, name: str) -> str:
    """The stripped content of a mounted secret file. CredentialsError (naming the file only) if unusable."""
    if directory is None:
        raise CredentialsError(f"secret {name!r}: no secrets directory configured")
    try:
        value = (directory / name).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise CredentialsError(f"cannot read secret {name!r}: {reason}") from None
    if not value:
        raise CredentialsError(f"secret {name!r} is empty")
    return value


class Credentials:
    """No credentials; the base of the kinds that send some."""

    hint = ""  # appended to an auth error: which secret to check

    async def header(self) -> str | None:
        """The Authorization header value for the next request (None: send none)."""
        return None

    async def refresh(self, refused: str) -> bool:
        """After ``refused`` got a 401: whether a different header is now worth one more try."""
        return False


class BearerFile(Credentials):
    """A static bearer token from a mounted secret file (read now, i.e. at each connect, and after a 401)."""

    def __init__(self, directory: Path | None, name: str) -> None:
        self._directory = directory
        self._name = name
        self._token = read_secret(directory, name)
        self.hint = f"check secret {name!r}"

    def __repr__(self) -> str:
        return f"BearerFile(secret={self._name!r})"

    async def header(self) -> str | None:
        return f"Bearer {self._token}"

    async def refresh(self, refused: str) -> bool:
        if refused != f"Bearer {self._token}":
            return True  # a concurrent request has already re-read it
        try:
            fresh = read_secret(self._directory, self._name)
        except CredentialsError:
            return False
        if fresh == self._token:
            return False
        log.info("secret %r changed; using the new token", self._name)
        self._token = fresh
        return True


class ClientCredentials(Credentials):
    """OAuth 2 client credentials grant: a token endpoint, a client id, the client secret's file."""

    def __init__(
        self,
        *,
        token_url: str,
        client_id: str,
        scope: str,
        directory: Path | None,
        secret: str,
        verify: ssl.SSLContext,
        connect_timeout_s: float,
    ) -> None:
        self._token_url = token_url
        self._client_id = client_id
        self._scope = scope
        self._directory = directory
        self._secret_name = secret
        self._verify = verify
        self._connect_timeout_s = connect_timeout_s
        self._token: str | None = None
        self._renew_at = 0.0  # time.monotonic() when to fetch the next one
        self._lock = anyio.Lock()
        self.hint = f"check client {client_id!r} and secret {secret!r}"

    def __repr__(self) -> str:
        return f"ClientCredentials(token_url={display_url(self._token_url)!r}, client_id={self._client_id!r})"

    async def header(self) -> str | None:
        async with self._lock:
            if self._token is None or time.monotonic() >= self._renew_at:
                await self._fetch()
            assert self._token is not None
            return f"Bearer {self._token}"

    async def refresh(self, refused: str) -> bool:
        async with self._lock:
            if self._token is not None and refused != f"Bearer {self._token}":
                return True  # a concurrent request has already fetched a new one
            await self._fetch()  # CredentialsError propagates: the token endpoint is the problem now
            return True

    async def _fetch(self) -> None:
        where = f"token endpoint {display_url(self._token_url)}"
        secret = read_secret(self._directory, self._secret_name)
        form = {"grant_type": "client_credentials"} | ({"scope": self._scope} if self._scope else {})
        # RFC 6749 2.3.1: id and secret are form-encoded before they go into the Basic header.
        basic = httpx2.BasicAuth(quote(self._client_id, safe=""), quote(secret, safe=""))
        timeout = httpx2.Timeout(_TOKEN_READ_S, connect=self._connect_timeout_s)
        try:
            async with (
                httpx2.AsyncClient(verify=self._verify, timeout=timeout, trust_env=False) as client,
                client.stream(
                    "POST", self._token_url, data=form, auth=basic, headers={"accept": "application/json"}
                ) as response,
            ):
                body = await _read_capped(response, _TOKEN_BODY_BYTES)
        except (httpx2.HTTPError, ResponseCut) as exc:
            raise CredentialsError(f"{where}: {describe(exc)}") from None
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
        if response.status_code != 200:
            code = data.get("error") if isinstance(data, dict) else None
            shown = f" {code}" if isinstance(code, str) and _ERROR_CODE.match(code) else ""
            raise CredentialsError(f"{where} refused client {self._client_id!r}: HTTP {response.status_code}{shown}")
        token = data.get("access_token") if isinstance(data, dict) else None
        kind = data.get("token_type", "") if isinstance(data, dict) else ""
        if not isinstance(token, str) or not token or not isinstance(kind, str) or kind.lower() != "bearer":
            raise CredentialsError(f"{where} answered without a bearer access_token")
        expires_in = data.get("expires_in") if isinstance(data, dict) else None
        lifetime = float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else 3600.0
        self._token = token
        self._renew_at = time.monotonic() + max(lifetime - _TOKEN_EARLY_S, lifetime / 2)
        log.debug("fetched a token from %s (valid %gs)", where, lifetime)


def display_url(url: str) -> str:
    """The URL without userinfo, query or fragment: what may go into messages and logs."""
    try:
        return str(httpx2.URL(url).copy_with(userinfo=b"", query=None, fragment=None))
    except (httpx2.InvalidURL, TypeError, ValueError):
        return "<invalid url>"


async def _read_capped(response: httpx2.Response, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > limit:
            raise ResponseCut(f"response over {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _noted(request: Any) -> Exchange | None:
    """The caller's Exchange if this request is the one it waits for (see the module docstring)."""
    exchange = EXCHANGE.get()
    if exchange is None or exchange.posted:
        return None
    if exchange.method == "*":
        exchange.posted = True
        return exchange
    if request.method != "POST":
        return None
    try:
        body = json.loads(request.content)
    except (httpx2.RequestNotRead, httpx.RequestNotRead, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(body, dict) and body.get("method") == exchange.method and "id" in body:
        exchange.posted = True
        return exchange
    return None


class _BoundedBody:
    """A response body counted as it streams and cut off past its limit (either library)."""

    network: ClassVar[tuple[type[BaseException], ...]]  # the library's network errors

    def __init__(self, inner: Any, limit: int, declared: int, exchange: Exchange | None) -> None:
        self._inner = inner
        self._limit = limit
        self._declared = declared  # Content-Length, or -1
        self._exchange = exchange

    def _cut(self) -> ResponseCut:
        if self._exchange is not None:
            self._exchange.too_large = True
        return ResponseCut(f"response body over {self._limit} bytes; cut off")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._declared > self._limit:
            raise self._cut()
        seen = 0
        try:
            async for chunk in self._inner:
                seen += len(chunk)
                if seen > self._limit:  # before handing the chunk on: nothing above the limit is kept
                    raise self._cut()
                yield chunk
        except self.network as exc:
            if self._exchange is not None and self._exchange.error is None:
                self._exchange.error = exc
            raise ResponseCut(f"connection failed mid-response: {describe(exc)}") from exc

    async def aclose(self) -> None:
        await self._inner.aclose()


class _BoundedStream(_BoundedBody, httpx2.AsyncByteStream):
    network = (httpx2.TransportError,)


class _HttpxBoundedStream(_BoundedBody, httpx.AsyncByteStream):
    network = (httpx.TransportError,)


class _Layer:
    """Credentials, the size bound and the notes around an inner transport (see the module docstring);
    the subclasses bind it to one HTTP library."""

    _network: ClassVar[tuple[type[BaseException], ...]]  # what the inner transport raises
    _stream: ClassVar[type[_BoundedBody]]  # the bounded body, as the library's stream type
    _response: ClassVar[Any]  # the library's Response class (for stand-ins)
    _in_memory: ClassVar[type]  # the library's in-memory request body: one that can be sent twice

    def __init__(self, inner: Any, *, max_bytes: int, credentials: Credentials) -> None:
        self._inner = inner
        self._max_bytes = max_bytes
        self._credentials = credentials

    async def handle_async_request(self, request: Any) -> Any:
        exchange = _noted(request)
        request.headers["accept-encoding"] = "identity"
        try:
            header = await self._credentials.header()
        except CredentialsError as exc:
            return self._without_credentials(request, exchange, exc)
        response = await self._send(request, header, exchange)
        if response.status_code == 401 and header is not None and isinstance(request.stream, self._in_memory):
            try:
                again = await self._credentials.refresh(header)
                header = await self._credentials.header() if again else None
            except CredentialsError as exc:
                await response.aclose()
                return self._without_credentials(request, exchange, exc)
            if again:
                await response.aclose()
                response = await self._send(request, header, exchange)
        if exchange is not None:
            exchange.status = response.status_code
        return response

    def _without_credentials(self, request: Any, exchange: Exchange | None, exc: CredentialsError) -> Any:
        log.warning("no credentials for %s: %s", display_url(str(request.url)), exc)
        if exchange is not None:
            exchange.auth_error = str(exc)
            exchange.status = 401
        return self._stand_in(request, 401)

    async def _send(self, request: Any, header: str | None, exchange: Exchange | None) -> Any:
        if header is not None:
            request.headers["authorization"] = header
        try:
            response = await self._inner.handle_async_request(request)
        except self._network as exc:
            log.debug("%s %s failed: %s", request.method, display_url(str(request.url)), describe(exc))
            if exchange is not None:
                exchange.error = exc
            return self._stand_in(request, 502)
        declared = response.headers.get("content-length", "")
        response.stream = self._stream(
            response.stream, self._max_bytes, int(declared) if declared.isdigit() else -1, exchange
        )
        return response

    def _stand_in(self, request: Any, status: int) -> Any:
        """What the SDK gets instead of an exception: an error status it fails only this request for."""
        # The reason phrase keeps the library's request log line from reading as if the server had answered.
        reason = b"No Response (mesh stand-in)" if status == 502 else b"No Credentials (mesh stand-in)"
        return self._response(
            status,
            headers={"content-type": "text/plain"},
            content=b"",
            request=request,
            extensions={"reason_phrase": reason},
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


class BoundedTransport(_Layer, httpx2.AsyncBaseTransport):
    """``httpx2.AsyncHTTPTransport`` (the MCP SDK's) with credentials, a response size bound and
    per-request notes."""

    _network = (httpx2.TransportError,)
    _stream = _BoundedStream
    _response = httpx2.Response
    _in_memory = httpx2.ByteStream  # the SDK's POSTs carry their JSON in memory; a streamed body could not go twice


class HttpxBoundedTransport(_Layer, httpx.AsyncBaseTransport):
    """The same around ``httpx.AsyncHTTPTransport``, for the a2a SDK."""

    _network = (httpx.TransportError,)
    _stream = _HttpxBoundedStream
    _response = httpx.Response
    _in_memory = httpx.ByteStream
