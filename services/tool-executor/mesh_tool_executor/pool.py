"""The replicas of one tenant tool server: health, routing, breakers and failover.

A server lists one or more endpoints (``remote.Endpoint``: one MCP session over streamable HTTP
each; for an A2A agent, ``remote_a2a.A2AEndpoint``: one agent card URL each). A call goes to the
least loaded endpoint that is healthy and whose breaker admits it (ties: the one called least).
When the call fails because the endpoint is gone, it fails over to another one, but only when that
cannot run the effect twice:

- the request never reached the server (``sent`` is False: connection refused, TLS failed): any
  call may go elsewhere;
- it may have reached it (the connection died before the answer): only a read, or a tool that
  takes an idempotency key (its input schema has ``idempotency_key``; the executor fills it with
  the call's ledger key, the same on every replica, so the server itself deduplicates). A write
  without one is answered "outcome unknown" instead: the mesh promises at most once.

Refused credentials, an answer over the size limit and a timeout are not failed over: every
replica shares the credentials and the tool, and the call's time is spent. A failure marks the
endpoint unhealthy at once; the health loop (``check``) pings every endpoint and marks it healthy
again when it answers. Each endpoint's breaker (``mesh_resilience``) opens on a run of failures
and lets one probe through after its cooldown.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import mcp.types as types

from mesh_contracts.v1.tool_servers import EndpointHealth
from mesh_contracts.v1.work import CallRoute, RouteAttempt
from mesh_resilience import BreakerPolicy, CircuitBreaker
from mesh_tool_executor.errors import ToolExecutorError
from mesh_tool_executor.remote import EndpointError

BREAKER = BreakerPolicy(window_s=30.0, min_calls=3, failure_rate=0.5, cooldown_s=10.0)
"""Per endpoint: three calls of which half failed within 30 s open it for 10 s."""
_EWMA = 0.3
NOT_FAILED_OVER = ("auth", "too_large", "timeout", "protocol")


class RemoteEndpoint(Protocol):
    """What the pool needs of one replica, whatever it speaks (MCP or A2A): it fails with
    ``EndpointError`` only."""

    in_flight: int

    @property
    def url(self) -> str: ...

    async def list_tools(self) -> list[types.Tool]: ...

    async def call(
        self, tool: str, arguments: dict[str, Any], *, timeout_s: float, meta: dict[str, Any] | None = None
    ) -> types.CallToolResult: ...

    async def ping(self, *, timeout_s: float = 5.0) -> float: ...

    async def close(self) -> None: ...


class PoolError(ToolExecutorError):
    """A call no endpoint answered. ``kind`` is the last endpoint's (``EndpointError.kind``) or
    ``down`` (no endpoint to try) or ``unknown`` (an effect may have run; not retried)."""

    def __init__(self, message: str, kind: str, route: CallRoute) -> None:
        super().__init__(message)
        self.kind, self.route = kind, route


@dataclass
class Replica:
    """One endpoint and what the pool knows of it."""

    endpoint: RemoteEndpoint
    breaker: CircuitBreaker
    healthy: bool = True  # optimistic until a failure or a failed check says otherwise
    calls: int = 0
    failures: int = 0
    failovers: int = 0
    latency_ms: float = 0.0
    last_error: str = ""
    checked_at: float = 0.0

    def observe(self, ms: float) -> None:
        self.latency_ms = ms if self.latency_ms == 0 else (1 - _EWMA) * self.latency_ms + _EWMA * ms

    def health(self) -> EndpointHealth:
        state = self.breaker.state
        return EndpointHealth(
            url=self.endpoint.url,
            healthy=self.healthy,
            breaker="half-open" if state == "half_open" else state,
            in_flight=self.endpoint.in_flight,
            calls=self.calls,
            failures=self.failures,
            failovers=self.failovers,
            latency_ms=round(self.latency_ms, 2),
            last_error=self.last_error,
            checked_at=self.checked_at,
        )


@dataclass
class Pool:
    """The endpoints of one server (``label``: ``<tenant>/<server>``)."""

    label: str
    replicas: list[Replica] = field(default_factory=list)

    @classmethod
    def of(cls, label: str, endpoints: Sequence[RemoteEndpoint]) -> Pool:
        return cls(label, [Replica(e, CircuitBreaker(f"{label}#{i + 1}", BREAKER)) for i, e in enumerate(endpoints)])

    def pick(self, tried: set[int]) -> int | None:
        """The replica to call next: healthy and admitted by its breaker, least loaded, least
        called; when none is healthy, any one its breaker admits (it may be back)."""
        order = [i for i in range(len(self.replicas)) if i not in tried]
        random.shuffle(order)  # ties go to a random replica, not always the first
        healthy = sorted((i for i in order if self.replicas[i].healthy), key=self._load)
        for i in healthy + sorted((i for i in order if not self.replicas[i].healthy), key=self._load):
            if self.replicas[i].breaker.allow():
                return i
        return None

    def _load(self, i: int) -> tuple[int, int]:
        r = self.replicas[i]
        return r.endpoint.in_flight, r.calls

    async def call(
        self, tool: str, arguments: dict[str, Any], *, timeout_s: float, idempotent: bool, server: str
    ) -> tuple[types.CallToolResult, CallRoute]:
        """The first answer (an ``is_error`` result is an answer), and where it came from; else
        ``PoolError`` with the route tried."""
        route = CallRoute(server=server)
        started = time.monotonic()
        tried: set[int] = set()
        last: EndpointError | None = None
        while True:
            remaining = timeout_s - (time.monotonic() - started)
            i = self.pick(tried) if remaining > 0 else None
            if i is None:
                route.latency_ms = round((time.monotonic() - started) * 1000, 2)
                if last is None:
                    raise PoolError(f"{self.label}: no endpoint is up (all {len(self.replicas)} down or open)",
                                    "down", route)  # fmt: skip
                raise PoolError(str(last), last.kind if remaining > 0 else "timeout", route)
            tried.add(i)
            r = self.replicas[i]
            t0 = time.monotonic()
            try:
                result = await r.endpoint.call(tool, arguments, timeout_s=remaining)
            except EndpointError as exc:
                ms = (time.monotonic() - t0) * 1000
                route.attempts.append(RouteAttempt(endpoint=r.endpoint.url, outcome=exc.kind, latency_ms=round(ms, 2)))
                r.calls += 1
                r.failures += 1
                r.last_error = str(exc)[:300]
                if exc.kind in ("unreachable", "lost"):
                    r.healthy = False
                    r.breaker.record(False)
                elif exc.kind == "timeout":
                    r.breaker.record(False)
                else:
                    r.breaker.release()
                last = exc
                if exc.kind in NOT_FAILED_OVER:
                    route.latency_ms = round((time.monotonic() - started) * 1000, 2)
                    raise PoolError(str(exc), exc.kind, route) from None
                if exc.sent and not idempotent:
                    route.latency_ms = round((time.monotonic() - started) * 1000, 2)
                    raise PoolError(
                        f"{exc}; outcome unknown: the call may have run, and {tool} takes no idempotency key, "
                        "so it is not sent to another replica", "unknown", route,
                    ) from None  # fmt: skip
                r.failovers += 1
                continue
            except BaseException:
                r.breaker.release()
                raise
            ms = (time.monotonic() - t0) * 1000
            r.calls += 1
            r.healthy = True
            r.last_error = ""
            r.observe(ms)
            r.breaker.record(True)
            route.attempts.append(RouteAttempt(endpoint=r.endpoint.url, outcome="ok", latency_ms=round(ms, 2)))
            route.endpoint = r.endpoint.url
            route.latency_ms = round((time.monotonic() - started) * 1000, 2)
            return result, route

    async def check(self, timeout_s: float = 5.0) -> None:
        """Ping every endpoint (one after another: a server has a handful) and note its health."""
        for r in self.replicas:
            try:
                seconds = await r.endpoint.ping(timeout_s=timeout_s)
            except EndpointError as exc:
                r.healthy = False
                r.last_error = str(exc)[:300]
            else:
                r.healthy = True
                r.last_error = ""
                r.observe(seconds * 1000)
            r.checked_at = time.time()

    async def list_tools(self) -> list[types.Tool]:
        """What the server lists, from the first endpoint that answers (replicas serve one server)."""
        last: EndpointError | None = None
        for i in sorted(range(len(self.replicas)), key=lambda i: not self.replicas[i].healthy):
            r = self.replicas[i]
            try:
                tools = await r.endpoint.list_tools()
            except EndpointError as exc:
                r.healthy = False
                r.last_error = str(exc)[:300]
                last = exc
                if exc.kind == "auth":
                    raise
                continue
            r.healthy = True
            return tools
        assert last is not None
        raise last

    def health(self) -> list[EndpointHealth]:
        return [r.health() for r in self.replicas]

    async def close(self) -> None:
        for r in self.replicas:
            await r.endpoint.close()
