"""Remote MCP servers over MCP's streamable HTTP transport: one ``Endpoint`` per server URL.

An endpoint holds one MCP session (one ``Mcp-Session-Id``) at a time and runs calls on it
concurrently. Whatever goes wrong reaches the caller as one ``EndpointError`` with a ``kind``
(unreachable, lost, auth, too_large, timeout, protocol) and ``sent``: False only when the request
certainly never reached the server, so that retrying it elsewhere is safe even for a write tool.
The mesh promises at most once: nothing here ever retries a call that may have reached a server.

Sessions. As with the stdio mount (``mcp_mount.py``), the SDK's HTTP client, transport and
session are async context managers holding anyio task groups, so each session has one owner task
that enters them, initializes, lists the tools (which also primes the SDK's cache of output
schemas: a call to a tool it has not listed makes the SDK list the tools *after* the call, and
could fail a call that ran), then waits for "stop" and exits them; exiting sends the spec's
DELETE. Calls run in the callers' own tasks on the open session, so a caller's timeout or
cancellation ends only its call (the SDK then tells the server, ``notifications/cancelled``).

Failures. The HTTP layer (``remote_http.py``) notes what happened to each call's request (status,
network error, cut-off) in an ``Exchange`` and keeps network errors from ending the session;
``_classify`` reads that note together with the SDK's error:

- the request never reached the transport, could not connect (refused, DNS, TLS handshake, connect
  timeout), or the server no longer knows the session (HTTP 404): ``sent=False``;
- HTTP 401/403, or no credentials to be had (secret unreadable, token endpoint failed): ``auth``,
  ``sent=False``; the secret was already re-read (or the token re-fetched) once and the request
  sent again by the HTTP layer;
- the connection failed after the request went out, or the response ended without an answer
  (SSE stream ended, JSON body broken): ``lost``, ``sent=True``, as soon as the socket says so;
- the body went past ``max_response_bytes``: ``too_large``; the SDK's read timeout: ``timeout``;
- any other error status, a JSON-RPC error or an unusable result: ``protocol``.

HTTP statuses: a 4xx is read as the server refusing the request (``sent=False``: it did not run),
a 5xx as "it may have run" (``sent=True``).

A failure with ``sent=False`` that says the session is gone (unreachable, session unknown, session
closed under us) makes the endpoint open a new session and send once more; that is the "reconnect
once". A replaced session is not cut off: its calls still in flight finish on it, and it is closed
when the last one has.

Limits. Every HTTP response body (a JSON answer, an SSE stream, and the standalone GET stream over
its whole life) is cut off past ``max_response_bytes``; the SDK's per-event SSE limit is set to the
same. There is no HTTP read timeout: each request is bounded by its caller's ``timeout_s`` (a
reconnect included), opening a session by ``connect_timeout_s`` + 30 s. Proxies named in the
environment are not used: httpx2 would mount them beside our transport, bypassing its credentials
and bounds.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import anyio
import httpx2
import mcp.types as types
from mcp import ClientSession, MCPError
from mcp.client.streamable_http import streamable_http_client

from mesh_tool_executor.errors import ToolExecutorError
from mesh_tool_executor.mcp_mount import CLIENT_INFO
from mesh_tool_executor.remote_http import (
    EXCHANGE,
    BearerFile,
    BoundedTransport,
    ClientCredentials,
    Credentials,
    CredentialsError,
    Exchange,
    describe,
    display_url,
)

log = logging.getLogger("mesh.tool-executor.remote")
# httpx2 logs every request's full URL at INFO; a tenant's endpoint may carry a key in its query.
logging.getLogger("httpx2").setLevel(max(logging.WARNING, logging.getLogger("httpx2").level))

Kind = Literal["unreachable", "lost", "auth", "too_large", "timeout", "protocol"]
T = TypeVar("T")

_SECRET_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HANDSHAKE_S = 30.0  # initialize + tools/list, beyond the connect timeout
_GRACE_S = 2.0  # past a call's timeout: only guards against a write that never finishes
_CLOSE_WAIT_S = 10.0  # the SDK's DELETE on close is not bounded by itself
_LIST_PAGES = 100  # a server paging forever must not stall a listing forever
_NOT_SENT = (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout, httpx2.UnsupportedProtocol)


class EndpointError(ToolExecutorError):
    """A remote MCP request that failed; ``str()`` is one line naming the endpoint, never a secret."""

    def __init__(self, message: str, *, kind: Kind, sent: bool) -> None:
        super().__init__(message)
        self.kind: Kind = kind
        self.sent = sent  # False only when the request certainly never reached the server


@dataclass(frozen=True)
class Auth:
    """How to authenticate; holds file names only, never a secret (so its repr is safe)."""

    kind: Literal["none", "bearer", "oauth"] = "none"
    secret: str = ""  # file NAME in secrets_dir: the bearer token or the OAuth client secret
    token_url: str = ""  # oauth: token endpoint (client credentials grant, client authenticates with HTTP Basic)
    client_id: str = ""  # oauth
    scope: str = ""  # oauth, optional

    def __post_init__(self) -> None:
        if self.kind not in ("none", "bearer", "oauth"):
            raise ValueError(f"auth.kind: must be none, bearer or oauth, got {self.kind!r}")
        if self.kind == "none":
            return
        if not _SECRET_NAME.match(self.secret) or self.secret in (".", ".."):
            raise ValueError(f"auth.secret: must be a file name [A-Za-z0-9_.-]{{1,64}}, got {self.secret!r}")
        if self.kind == "oauth":
            if not _is_http_url(self.token_url):
                raise ValueError("auth.token_url: must be an http(s) URL for oauth")
            if not self.client_id:
                raise ValueError("auth.client_id: required for oauth")


@dataclass(frozen=True)
class EndpointConfig:
    """One remote server (an MCP endpoint, or an A2A agent's card: ``remote_a2a.py``). Invalid
    values raise ValueError naming the field."""

    url: str  # https://... (http:// for tests and in-cluster)
    auth: Auth = Auth()
    secrets_dir: Path | None = None  # secrets are read at each (re)connect and once more after a 401
    ca_file: str | None = None  # extra PEM CA bundle; TLS is always verified
    connect_timeout_s: float = 5.0
    max_response_bytes: int = 10 * 1024 * 1024  # per HTTP response body (JSON or an SSE stream)

    def __post_init__(self) -> None:
        if not _is_http_url(self.url):
            raise ValueError(f"url: must be an http:// or https:// URL with a host, got {display_url(self.url)!r}")
        if self.auth.kind != "none" and self.secrets_dir is None:
            raise ValueError(f"secrets_dir: required for auth kind {self.auth.kind}")
        timeout = self.connect_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 600:
            raise ValueError(f"connect_timeout_s: must be a number in (0, 600], got {timeout!r}")
        size = self.max_response_bytes
        if isinstance(size, bool) or not isinstance(size, int) or size < 1024:
            raise ValueError(f"max_response_bytes: must be an integer >= 1024, got {size!r}")


def _is_http_url(url: str) -> bool:
    try:
        parsed = httpx2.URL(url)
    except (httpx2.InvalidURL, TypeError):
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.host)


def tls_and_credentials(config: EndpointConfig, where: str) -> tuple[ssl.SSLContext, Credentials]:
    """The TLS context (always verifying; the config's CA bundle added) and the credentials to send,
    read now (at each connect); EndpointError (naming files, never a secret) if either cannot be had."""
    try:
        verify = ssl.create_default_context()
        if config.ca_file:
            verify.load_verify_locations(cafile=config.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise EndpointError(
            f"{where}: cannot use ca_file {config.ca_file!r}: {describe(exc)}", kind="unreachable", sent=False
        ) from None
    auth, directory = config.auth, config.secrets_dir
    try:
        if auth.kind == "bearer":
            return verify, BearerFile(directory, auth.secret)
        if auth.kind == "oauth":
            return verify, ClientCredentials(
                token_url=auth.token_url,
                client_id=auth.client_id,
                scope=auth.scope,
                directory=directory,
                secret=auth.secret,
                verify=verify,
                connect_timeout_s=config.connect_timeout_s,
            )
    except CredentialsError as exc:
        raise EndpointError(f"{where}: {exc}", kind="auth", sent=False) from None
    return verify, Credentials()


def _leaf(exc: BaseException) -> BaseException:
    # anyio task groups wrap failures in exception groups; the first leaf is the cause.
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    return " ".join(text.split())[:limit]


async def _list_all(client: ClientSession) -> list[types.Tool]:
    tools: list[types.Tool] = []
    cursor: str | None = None
    for _ in range(_LIST_PAGES):
        EXCHANGE.set(Exchange("tools/list"))  # one note per page: a failure is classified by its own page
        page = await client.list_tools(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools
    log.warning("tools/list still paging after %d pages; using what was listed", _LIST_PAGES)
    return tools


class _Session:
    """One MCP session and the owner task holding it open (see the module docstring)."""

    def __init__(self, url: str, http: httpx2.AsyncClient, *, max_sse: int, handshake_s: float, name: str) -> None:
        self.client: ClientSession | None = None
        self.users = 0  # calls running on it
        self.retired = False  # replaced: closes once its users are done
        self.dead = False  # its owner task has ended
        self.announced = False  # the endpoint has taken its tool listing
        self.failure: tuple[BaseException, Exchange | None] | None = None  # why it did not open
        self._stop = anyio.Event()
        self.ready: asyncio.Future[list[types.Tool]] = asyncio.get_running_loop().create_future()
        # Nobody may be left waiting (a caller that timed out): do not warn about an unread exception.
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._owner = asyncio.create_task(self._own(url, http, max_sse, handshake_s), name=f"mcp-remote-{name}")

    @property
    def usable(self) -> bool:
        opened = self.ready.done() and not self.ready.cancelled() and self.ready.exception() is None
        return opened and not self.dead and not self.retired and self.client is not None

    def stop(self) -> None:
        self._stop.set()

    async def join(self) -> None:
        done, _ = await asyncio.wait({self._owner}, timeout=_CLOSE_WAIT_S)
        if not done:
            log.error("an MCP session did not close in %ss; cancelling it", _CLOSE_WAIT_S)
            self._owner.cancel()
            with suppress(asyncio.CancelledError):
                await self._owner

    async def _own(self, url: str, http: httpx2.AsyncClient, max_sse: int, handshake_s: float) -> None:
        try:
            async with (
                http,
                streamable_http_client(url, http_client=http, max_sse_event_size=max_sse) as (read, write),
                ClientSession(read, write, client_info=CLIENT_INFO) as client,
            ):
                with anyio.fail_after(handshake_s):
                    EXCHANGE.set(Exchange("initialize"))
                    await client.initialize()
                    tools = await _list_all(client)
                self.client = client
                self.ready.set_result(tools)
                await self._stop.wait()
        except Exception as exc:  # noqa: BLE001 - whatever the server does is reported to the caller, never fatal here
            self.failure = (_leaf(exc), EXCHANGE.get())
            if self.ready.done():
                log.warning("an MCP session at %s ended: %s", display_url(url), describe(_leaf(exc)))
        finally:
            self.client = None
            self.dead = True
            if not self.ready.done():
                # Even a cancelled owner must not leave a caller waiting forever.
                self.ready.set_exception(self.failure[0] if self.failure else EOFError("session closed"))


class Endpoint:
    """One remote MCP server (see the module docstring)."""

    def __init__(self, config: EndpointConfig, *, label: str) -> None:
        self.config = config
        self.label = label  # e.g. "acme/orders#1", for logs and messages
        self.in_flight = 0  # calls running now (for least-loaded routing)
        self.last_error: str | None = None  # the last failure; cleared when a session opens
        self._url = display_url(config.url)
        self._session: _Session | None = None
        self._old: set[_Session] = set()  # replaced sessions, closing once their calls are done
        self._tools: list[types.Tool] = []
        self._healthy = True  # False after a failure that suggests the server is gone, until a success
        self._closed = False
        self._lock = asyncio.Lock()
        self._hint = ""  # which secret to check, for auth errors

    def __repr__(self) -> str:
        return f"Endpoint({self.label!r}, {self._url!r})"

    @property
    def url(self) -> str:
        """The URL without userinfo or query: safe for display."""
        return self._url

    @property
    def connected(self) -> bool:
        """A session is open and believed alive."""
        return self._session is not None and self._session.usable and self._healthy

    @property
    def _where(self) -> str:
        return f"{self.label} ({self._url})"

    def _setup_s(self) -> float:
        return self.config.connect_timeout_s + _HANDSHAKE_S

    async def connect(self) -> list[types.Tool]:
        """Open the session (initialize) and list all tools; the current listing if already open."""
        deadline = asyncio.get_running_loop().time() + self._setup_s()
        try:
            await self._live_session(deadline)
        except EndpointError as exc:
            self._note(exc)
            raise
        return list(self._tools)

    async def list_tools(self) -> list[types.Tool]:
        """List the tools again on the open session (reconnecting if needed)."""

        async def op(client: ClientSession, remaining: float) -> list[types.Tool]:
            with anyio.fail_after(remaining):
                return await _list_all(client)

        self._tools = await self._run("tools/list", "tools/list", op, self._setup_s())
        return list(self._tools)

    async def call(
        self, tool: str, arguments: dict[str, Any], *, timeout_s: float, meta: dict[str, Any] | None = None
    ) -> types.CallToolResult:
        """Call a tool. A tool-level error is a normal result (``is_error``); anything else, EndpointError."""

        async def op(client: ClientSession, remaining: float) -> types.CallToolResult:
            # The SDK's own timeout also tells the server to stop (notifications/cancelled).
            return await client.call_tool(
                tool, arguments, read_timeout_seconds=remaining, meta=cast(types.RequestParamsMeta | None, meta)
            )

        return await self._run(f"tools/call {tool}", "tools/call", op, timeout_s)

    async def ping(self, *, timeout_s: float = 5.0) -> float:
        """Seconds the MCP ping took (not counting a reconnect)."""
        loop = asyncio.get_running_loop()

        async def op(client: ClientSession, remaining: float) -> float:
            start = loop.time()
            request = types.PingRequest(params=types.RequestParams())
            await client.send_request(request, types.EmptyResult, request_read_timeout_seconds=remaining)
            return loop.time() - start

        return await self._run("ping", "ping", op, timeout_s)

    async def close(self) -> None:
        """End the sessions (DELETE) and their tasks; calls still running fail. Safe to call twice."""
        self._closed = True
        sessions = [s for s in (self._session, *self._old) if s is not None]
        self._session = None
        self._old.clear()
        for session in sessions:
            session.stop()
        await asyncio.gather(*(s.join() for s in sessions))

    async def _run(
        self, what: str, method: str, op: Callable[[ClientSession, float], Awaitable[T]], timeout_s: float
    ) -> T:
        """``op`` on a live session within ``timeout_s`` in all; once more on a new session if it was not sent."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self.in_flight += 1
        try:
            for attempt in (1, 2):
                session = await self._session_for(deadline, what)
                session.users += 1
                reset = EXCHANGE.set(Exchange(method))
                try:
                    if session.client is None:  # it ended between the check and now
                        raise MCPError(code=types.CONNECTION_CLOSED, message="Connection closed")
                    async with asyncio.timeout_at(deadline + _GRACE_S):
                        result = await op(session.client, max(deadline - loop.time(), 0.001))
                except Exception as exc:  # noqa: BLE001 - classified below, raised as EndpointError
                    error, renew = self._classify(exc, EXCHANGE.get(), what=what, timeout_s=timeout_s)
                else:
                    self._healthy = True
                    return result
                finally:
                    EXCHANGE.reset(reset)
                    self._release(session)
                if renew:
                    self._retire(session)
                if renew and attempt == 1 and not self._closed:
                    log.warning("%s; opening a new session and sending %s once more", error, what)
                    continue
                self._note(error)
                raise error
            raise AssertionError("unreachable")
        finally:
            self.in_flight -= 1

    async def _session_for(self, deadline: float, what: str) -> _Session:
        """The live session for a request; EndpointError(sent=False) if none can be had in time."""
        try:
            return await self._live_session(deadline)
        except EndpointError as exc:
            error = (
                exc
                if what in ("tools/list", "ping")
                else EndpointError(f"{exc}; {what} was not sent", kind=exc.kind, sent=False)
            )
            self._note(error)
            raise error from None

    async def _live_session(self, deadline: float) -> _Session:
        async with self._lock:
            if self._closed:
                raise EndpointError(f"{self._where} is closed", kind="unreachable", sent=False)
            session = self._session
            if session is None or session.dead or session.retired or (session.ready.done() and not session.usable):
                if session is not None:
                    self._retire(session)
                session = self._session = self._open()
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            tools = await asyncio.wait_for(asyncio.shield(session.ready), max(remaining, 0.001))
        except TimeoutError:
            raise EndpointError(f"{self._where} did not open a session in time", kind="timeout", sent=False) from None
        except Exception:  # noqa: BLE001 - the owner's failure, classified from its note
            if session.failure is None:  # its owner was cancelled: the endpoint is closing
                raise EndpointError(f"{self._where}: closed while opening", kind="unreachable", sent=False) from None
            error, _ = self._classify(
                session.failure[0], session.failure[1], what="initialize", timeout_s=self._setup_s()
            )
            raise EndpointError(str(error), kind=error.kind, sent=False) from None
        if not session.announced:  # the first caller to see it open takes its listing
            session.announced = True
            log.info("%s: session open, %d tools", self._where, len(tools))
            self._tools = tools
            self.last_error = None
            self._healthy = True
        return session

    def _open(self) -> _Session:
        """A new session (its owner starts now); EndpointError if the credentials or CA file cannot be read."""
        config = self.config
        verify, credentials = tls_and_credentials(config, self._where)
        self._hint = credentials.hint
        inner = httpx2.AsyncHTTPTransport(verify=verify)
        http = httpx2.AsyncClient(
            transport=BoundedTransport(inner, max_bytes=config.max_response_bytes, credentials=credentials),
            # Reads are unbounded here: each request is bounded by its caller's timeout, and the
            # standalone GET stream may rightly stay silent for hours.
            timeout=httpx2.Timeout(None, connect=config.connect_timeout_s, pool=config.connect_timeout_s),
            # No proxies from the environment: they would be mounted beside our transport, bypassing
            # its credentials and bounds.
            trust_env=False,
        )
        return _Session(
            config.url, http, max_sse=config.max_response_bytes, handshake_s=self._setup_s(), name=self.label
        )

    def _retire(self, session: _Session) -> None:
        session.retired = True
        if self._session is session:
            self._session = None
        self._old = {s for s in self._old if not s.dead}
        self._old.add(session)
        if session.users == 0:
            session.stop()

    def _release(self, session: _Session) -> None:
        session.users -= 1
        if session.retired and session.users == 0:
            session.stop()

    def _note(self, error: EndpointError) -> None:
        self.last_error = str(error)
        if error.kind in ("unreachable", "lost"):
            self._healthy = False

    def _classify(
        self, exc: BaseException, exchange: Exchange | None, *, what: str, timeout_s: float
    ) -> tuple[EndpointError, bool]:
        """(the error for the caller, whether the session is gone and the request may go on a new one)."""
        where, note = self._where, exchange or Exchange(what)
        status = note.status

        def fail(message: str, kind: Kind, sent: bool, renew: bool = False) -> tuple[EndpointError, bool]:
            return EndpointError(one_line(message, 500), kind=kind, sent=sent), renew

        if note.auth_error is not None:
            return fail(f"{where}: no credentials: {note.auth_error}", "auth", False)
        if status in (401, 403) and note.error is None:
            hint = f" ({self._hint})" if self._hint else ""
            return fail(f"{where} refused the credentials: HTTP {status}{hint}", "auth", False)
        if note.too_large:
            limit = self.config.max_response_bytes
            return fail(f"{where} answered {what} with more than {limit} bytes; cut off", "too_large", True)
        if note.error is not None:
            if isinstance(note.error, _NOT_SENT):
                return fail(f"{where} is unreachable: {describe(note.error)}", "unreachable", False, True)
            return fail(
                f"{where} lost the connection during {what} ({describe(note.error)}); it may have run", "lost", True
            )
        if isinstance(exc, TimeoutError):
            return fail(f"{where}: no answer to {what} within {timeout_s:g}s", "timeout", note.posted)
        if not isinstance(exc, MCPError):
            text = f"{type(exc).__name__}: {exc}"
            return fail(f"{where} gave an unusable answer to {what}: {text}", "protocol", note.posted)
        if exc.code == types.REQUEST_TIMEOUT:
            return fail(f"{where}: no answer to {what} within {timeout_s:g}s", "timeout", True)
        if exc.code == types.CONNECTION_CLOSED and self._closed:
            return fail(f"{where}: {what} interrupted: the endpoint is closing", "lost", note.posted)
        if not note.posted:  # the session ended before the request reached the network
            return fail(f"{where}: the session ended before {what} was sent", "lost", False, True)
        if exc.code == types.CONNECTION_CLOSED:
            return fail(f"{where} ended the response to {what} without an answer; it may have run", "lost", True)
        if status == 404 and what != "initialize":
            return fail(f"{where} no longer knows the session (HTTP 404); {what} did not run", "lost", False, True)
        if status is not None and status >= 400:
            # A 4xx is the server refusing the request (it did not run); after a 5xx it may have.
            detail = f": {exc.message}" if exc.message != "Server returned an error response" else ""
            return fail(f"{where} answered {what} with HTTP {status}{detail}", "protocol", status >= 500)
        return fail(f"{where} answered {what} with error {exc.code}: {exc.message}", "protocol", True)
