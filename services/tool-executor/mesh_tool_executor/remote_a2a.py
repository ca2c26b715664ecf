"""External A2A agents as remote tools: one ``A2AEndpoint`` per agent card URL, with the interface
of an MCP ``remote.Endpoint`` (``connect``, ``list_tools``, ``call``, ``ping``, ``close``), so that
the pool, the pins, approvals, policy, budgets and audit treat an agent as any tenant tool server.

It speaks the a2a SDK's client (``a2a.client``: the card resolver, ``ClientFactory`` and its
JSON-RPC transport) over an ``httpx`` client whose transport is the mesh's own
(``remote_http.HttpxBoundedTransport``): the tenant's credentials from mounted secrets (read again
after a 401), TLS always verified (an extra CA bundle if configured), every response body cut off
past ``max_response_bytes``, no proxies from the environment, no redirects followed, and a note of
what happened to each request (``Exchange``) to classify failures by. What the card means as tools,
and what a reply means as a result, is ``a2a_mapping.py``.

The card. ``connect`` and ``list_tools`` fetch the card, and so does ``ping`` (the health check:
each replica follows its own card). The JSON-RPC interface used is one the card names on the card
URL's own origin: the tenant's credentials go only where the tenant registered, and a card cannot
point calls at another host (an internal address, say). A card without one cannot be used.

A call sends one message (its text: the ``message`` argument; its id: derived from the call's
idempotency key, so a retry is the same message) and asks for the task at once
(``return_immediately``); then it asks for the task again, at growing intervals up to a second,
until it settles, all within the call's ``timeout_s``. A call that ends before its task settled
(its time ran out, the caller gave up, the connection was lost while waiting) and a task waiting for
input are canceled at the agent, in the background.

Failures reach the caller as ``EndpointError`` (``kind``, ``sent``) as for MCP endpoints:

- no credentials, or HTTP 401/403 to the message: ``auth``, not sent;
- could not connect: ``unreachable``, not sent; the connection broke after the message went out:
  ``lost``, sent; so did any failure while waiting for the task (the message may have run);
- an answer over the size limit: ``too_large``; out of time: ``timeout``;
- the agent refused the message (a JSON-RPC error, an HTTP error status) or answered what is not
  A2A: ``protocol`` (sent after a 5xx or a JSON-RPC error: it may have run).

Every message names the endpoint by its label and its URL without query or userinfo; no secret is
in any message, log line or repr, and the SDK's own messages (which quote full URLs) are not passed
on.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from contextlib import suppress
from functools import partial
from typing import Any, TypeVar

import httpx
import mcp.types as types
from a2a.client import A2ACardResolver, Client, ClientConfig, ClientFactory
from a2a.client.errors import A2AClientError, AgentCardResolutionError
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    GetTaskRequest,
    Message,
    Part,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    Task,
)
from a2a.utils.constants import TransportProtocol
from a2a.utils.errors import A2AError

from mesh_tool_executor import a2a_mapping as mapping
from mesh_tool_executor.remote import EndpointConfig, EndpointError, Kind, one_line, tls_and_credentials
from mesh_tool_executor.remote_http import EXCHANGE, Exchange, HttpxBoundedTransport, describe, display_url
from mesh_tool_executor.tool_servers import IDEMPOTENCY_ARG

log = logging.getLogger("mesh.tool-executor.remote")
# Both log full URLs at INFO (httpx each request, the resolver each card with its URL): a tenant's
# card URL may carry a key in its query.
for _name in ("httpx", "a2a.client.card_resolver"):
    logging.getLogger(_name).setLevel(max(logging.WARNING, logging.getLogger(_name).level))

T = TypeVar("T")
_CARD_S = 30.0  # reading a card, beyond the connect timeout
_POLL_FIRST_S, _POLL_MAX_S = 0.05, 1.0
_CANCEL_S = 10.0  # a background cancel of an abandoned task
_HISTORY = 1  # messages of the task's history to return: the agent's last one is an answer of last resort
_MESSAGE_IDS = uuid.UUID("6f1f4a52-8c3e-4e0e-9d2b-a2a0a2a0a2a0")  # uuid5 namespace of message ids
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)
_URL = re.compile(r"https?://[^\s'\"<>]+")


def message_id(key: str) -> str:
    """The A2A message id of a call: the same for the same idempotency key (a retry is the same message)."""
    return str(uuid.uuid5(_MESSAGE_IDS, key)) if key else str(uuid.uuid4())


def _safe(text: str) -> str:
    """Text from the SDK or an agent with each URL shown without userinfo or query."""
    return one_line(_URL.sub(lambda m: display_url(m.group(0)), text))


class A2AEndpoint:
    """One replica of an external A2A agent, by its card URL (see the module docstring)."""

    def __init__(self, config: EndpointConfig, *, label: str) -> None:
        self.config = config
        self.label = label  # e.g. "acme/travel#1", for logs and messages
        self.in_flight = 0  # calls running now (for least-loaded routing)
        self.last_error: str | None = None  # the last failure; cleared when the card is read
        self._url = display_url(config.url)
        self._base, self._path = mapping.card_location(config.url)
        self._http: httpx.AsyncClient | None = None
        self._hint = ""  # which secret to check, for auth errors
        self._client: Client | None = None  # for the card read last
        self._tools: list[types.Tool] = []
        self._skills: dict[str, str] = {}  # tool name -> skill id
        self._healthy = True
        self._closed = False
        self._cancels: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"A2AEndpoint({self.label!r}, {self._url!r})"

    @property
    def url(self) -> str:
        """The card URL without userinfo or query: safe for display."""
        return self._url

    @property
    def connected(self) -> bool:
        """The card has been read and the agent is believed up."""
        return self._client is not None and self._healthy and not self._closed

    @property
    def _where(self) -> str:
        return f"{self.label} ({self._url})"

    # --- the card ------------------------------------------------------------------------------------

    async def connect(self) -> list[types.Tool]:
        """Read the card (unless read already) and list its tools."""
        if self._client is None:
            await self._read_card(self.config.connect_timeout_s + _CARD_S)
        return list(self._tools)

    async def list_tools(self) -> list[types.Tool]:
        """Read the card again and list its tools."""
        await self._read_card(self.config.connect_timeout_s + _CARD_S)
        return list(self._tools)

    async def ping(self, *, timeout_s: float = 5.0) -> float:
        """Seconds reading the card took (the card is taken: each replica follows its own)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self._read_card(timeout_s)
        return loop.time() - start

    async def _read_card(self, timeout_s: float) -> None:
        http = self._http_client()
        card = await self._request("the agent card", lambda: A2ACardResolver(http, self._base, self._path)
                                   .get_agent_card(), timeout_s=timeout_s)  # fmt: skip
        try:
            client = self._client_for(card, http)
        except EndpointError as exc:
            self._client = None  # no calls by an older card meanwhile: they fail, not sent, until it is usable
            self._note(exc)
            raise
        self._tools, self._skills = mapping.card_tools(card, self.config.url)
        if self._client is None:
            log.info("%s: agent card read, %d tools", self._where, len(self._tools))
        self._client = client
        self.last_error = None
        self._healthy = True

    def _client_for(self, card: AgentCard, http: httpx.AsyncClient) -> Client:
        """A client for the card's JSON-RPC interfaces on the card's own origin (EndpointError if none)."""
        home = mapping.origin(self.config.url)
        interfaces = [i for i in card.supported_interfaces if i.protocol_binding == TransportProtocol.JSONRPC]
        usable = [i for i in interfaces if mapping.origin(i.url) == home]
        if not usable:
            named = ", ".join(display_url(i.url) for i in interfaces) or "none"
            raise EndpointError(
                f"{self._where}: the agent card names no JSON-RPC interface on the card's own origin (it names: "
                f"{named}); the tenant's credentials and calls go only where the card was registered",
                kind="protocol", sent=False,
            )  # fmt: skip
        offered = AgentCard()
        offered.CopyFrom(card)
        del offered.supported_interfaces[:]
        offered.supported_interfaces.extend(usable)
        config = ClientConfig(streaming=False, polling=True, httpx_client=http,
                              supported_protocol_bindings=[TransportProtocol.JSONRPC])  # fmt: skip
        try:
            return ClientFactory(config).create(offered)
        except ValueError as exc:
            raise EndpointError(f"{self._where}: the agent card is not usable: {_safe(str(exc))}", kind="protocol",
                                sent=False) from None  # fmt: skip

    def _http_client(self) -> httpx.AsyncClient:
        """The endpoint's HTTP client, made at first use (again after the credentials could not be read)."""
        if self._closed:
            raise EndpointError(f"{self._where} is closed", kind="unreachable", sent=False)
        if self._http is None:
            try:
                verify, credentials = tls_and_credentials(self.config, self._where)
            except EndpointError as exc:
                self._note(exc)
                raise
            self._hint = credentials.hint
            config = self.config
            self._http = httpx.AsyncClient(
                transport=HttpxBoundedTransport(httpx.AsyncHTTPTransport(verify=verify),
                                                max_bytes=config.max_response_bytes, credentials=credentials),
                # Reads are bounded by each call's own timeout; connecting by the connect timeout.
                timeout=httpx.Timeout(None, connect=config.connect_timeout_s, pool=config.connect_timeout_s),
                trust_env=False,  # proxies from the environment would bypass the transport's credentials and bounds
                follow_redirects=False,
            )  # fmt: skip
        return self._http

    # --- calls ---------------------------------------------------------------------------------------

    async def call(
        self, tool: str, arguments: dict[str, Any], *, timeout_s: float, meta: dict[str, Any] | None = None
    ) -> types.CallToolResult:
        """Ask the agent (``meta`` is not used: A2A has no place for it). The agent's failure or
        question is an ``is_error`` result; anything else, ``EndpointError``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self.in_flight += 1
        try:
            if self._client is None:
                try:
                    await self._read_card(timeout_s)
                except EndpointError as exc:
                    raise EndpointError(f"{exc}; {tool} was not sent", kind=exc.kind, sent=False) from None
            client, skills = self._client, self._skills
            assert client is not None
            if tool not in skills:
                raise EndpointError(f"{self._where}: the agent card offers no tool {tool!r} (any longer)",
                                    kind="protocol", sent=False)  # fmt: skip
            message = Message(message_id=message_id(str(arguments.get(IDEMPOTENCY_ARG, ""))),
                              role=Role.ROLE_USER, parts=[Part(text=str(arguments.get("message", "")))])  # fmt: skip
            if skills[tool]:
                message.metadata.update({"skill": skills[tool]})
            result = await self._ask(client, message, tool, deadline, timeout_s)
            self._healthy = True
            return result
        finally:
            self.in_flight -= 1

    async def _ask(
        self, client: Client, message: Message, tool: str, deadline: float, timeout_s: float
    ) -> types.CallToolResult:
        """Send, then follow the task until it settles (canceled at the agent if it is left unsettled)."""
        loop = asyncio.get_running_loop()
        what = f"{tool}'s message"
        request = SendMessageRequest(
            message=message, configuration=SendMessageConfiguration(return_immediately=True, history_length=_HISTORY)
        )
        reply: Task | Message = await self._request(what, lambda: _send(client, request),
                                                    timeout_s=max(deadline - loop.time(), 0.001), limit_s=timeout_s)  # fmt: skip
        if isinstance(reply, Message):
            return mapping.outcome(reply)
        task_id, pause, finished = reply.id, _POLL_FIRST_S, False
        try:
            while reply.status.state not in mapping.SETTLED:
                await asyncio.sleep(min(pause, max(deadline - loop.time(), 0)))
                pause = min(pause * 2, _POLL_MAX_S)
                if loop.time() >= deadline:
                    raise self._fail(f"{self._where}: {tool} did not finish within {timeout_s:g}s", "timeout", True)
                get = partial(client.get_task, GetTaskRequest(id=task_id, history_length=_HISTORY))
                reply = await self._request(f"{tool}'s task", get, timeout_s=deadline - loop.time(),
                                            limit_s=timeout_s, after_send=True)  # fmt: skip
            finished = reply.status.state in mapping.FINISHED
        finally:
            if not finished and task_id:
                self._cancel_later(client, task_id)
        return mapping.outcome(reply)

    async def _request(
        self, what: str, op: Callable[[], Awaitable[T]], *, timeout_s: float, limit_s: float | None = None,
        after_send: bool = False,
    ) -> T:  # fmt: skip
        """One HTTP request of the SDK's within ``timeout_s`` (what is left of the call's ``limit_s``),
        its failure classified (``after_send``: the call's message already went out, so whatever fails
        now, it may have run)."""
        reset = EXCHANGE.set(Exchange("*"))
        try:
            async with asyncio.timeout(timeout_s):
                return await op()
        except Exception as exc:  # noqa: BLE001 - classified below, raised as EndpointError
            error = self._classify(exc, EXCHANGE.get(), what=what, timeout_s=limit_s or timeout_s)
        finally:
            EXCHANGE.reset(reset)
        if after_send and not error.sent:
            kind: Kind = "lost" if error.kind == "unreachable" else error.kind
            error = EndpointError(f"{error}; the message was sent before, so it may have run", kind=kind, sent=True)
        self._note(error)
        raise error

    def _cancel_later(self, client: Client, task_id: str) -> None:
        """Cancel the agent's task in the background (the caller may be gone already)."""

        async def cancel() -> None:
            reset = EXCHANGE.set(None)
            try:
                async with asyncio.timeout(_CANCEL_S):
                    await client.cancel_task(CancelTaskRequest(id=task_id))
            except Exception as exc:  # noqa: BLE001 - best effort: the task may have settled meanwhile
                log.debug("%s: task %s not canceled: %s", self._where, task_id, type(exc).__name__)
            finally:
                EXCHANGE.reset(reset)

        job = asyncio.get_running_loop().create_task(cancel(), name=f"a2a-cancel-{self.label}")
        self._cancels.add(job)
        job.add_done_callback(self._cancels.discard)

    async def close(self) -> None:
        """Let the background cancels finish (briefly), then close the HTTP client. Safe to call twice."""
        self._closed = True
        if self._cancels:
            _, pending = await asyncio.wait(set(self._cancels), timeout=_CANCEL_S)
            for job in pending:
                job.cancel()
            with suppress(asyncio.CancelledError):
                await asyncio.gather(*pending, return_exceptions=True)
        http, self._http, self._client = self._http, None, None
        if http is not None:
            await http.aclose()

    # --- failures ------------------------------------------------------------------------------------

    def _note(self, error: EndpointError) -> None:
        self.last_error = str(error)
        if error.kind in ("unreachable", "lost"):
            self._healthy = False

    @staticmethod
    def _fail(message: str, kind: Kind, sent: bool) -> EndpointError:
        return EndpointError(one_line(message, 500), kind=kind, sent=sent)

    def _classify(self, exc: BaseException, exchange: Exchange | None, *, what: str, timeout_s: float) -> EndpointError:
        """The caller's error for a failed request (see the module docstring)."""
        where, note, fail = self._where, exchange or Exchange("*"), self._fail
        status = note.status
        if isinstance(exc, EndpointError):
            return exc
        if note.auth_error is not None:
            return fail(f"{where}: no credentials: {note.auth_error}", "auth", False)
        if status in (401, 403) and note.error is None:
            hint = f" ({self._hint})" if self._hint else ""
            return fail(f"{where} refused the credentials: HTTP {status}{hint}", "auth", False)
        if note.too_large:
            return fail(f"{where} answered {what} with more than {self.config.max_response_bytes} bytes; cut off",
                        "too_large", True)  # fmt: skip
        if note.error is not None:
            if isinstance(note.error, _NOT_SENT):
                return fail(f"{where} is unreachable: {describe(note.error)}", "unreachable", False)
            return fail(f"{where} lost the connection during {what} ({describe(note.error)}); it may have run",
                        "lost", True)  # fmt: skip
        if isinstance(exc, TimeoutError):
            return fail(f"{where}: no answer to {what} within {timeout_s:g}s", "timeout", note.posted)
        if isinstance(exc, AgentCardResolutionError):
            return self._card_error(exc, status)
        if status is not None and status >= 400:
            # A 4xx is the agent refusing the request (it did not run); after a 5xx it may have.
            return fail(f"{where} answered {what} with HTTP {status}", "protocol", status >= 500)
        if isinstance(exc, A2AError) and not isinstance(exc, A2AClientError):
            # The agent's own JSON-RPC error (invalid params, unsupported content, task not found ...).
            return fail(f"{where} refused {what}: {type(exc).__name__}: {_safe(exc.message)}", "protocol", True)
        text = _safe(f"{type(exc).__name__}: {exc}")
        return fail(f"{where} gave an unusable answer to {what}: {text}", "protocol", note.posted)

    def _card_error(self, exc: AgentCardResolutionError, status: int | None) -> EndpointError:
        where = self._where
        if status == 404:
            return self._fail(f"{where}: no agent card there (HTTP 404)", "protocol", False)
        if status is not None and status >= 300:
            return self._fail(f"{where} answered the agent card request with HTTP {status}", "protocol", False)
        cause = exc.__cause__
        why = _safe(f"{type(cause).__name__}: {cause}") if cause is not None else "not an agent card"
        return self._fail(f"{where}: the agent card is not valid: {why}", "protocol", False)


async def _send(client: Client, request: SendMessageRequest) -> Task | Message:
    """The agent's reply to a message: a message, or its task as it is now. (Not streamed: the SDK
    yields the one reply and ends.)"""
    for event in [event async for event in client.send_message(request)]:
        if event.HasField("task"):
            return event.task
        if event.HasField("message"):
            return event.message
    raise A2AClientError("the agent sent neither a task nor a message")
