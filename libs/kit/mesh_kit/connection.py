"""The service's one connection to NATS, as its own identity: connect, publish (signed, with
deterministic ids), emit, request, KV.

FastStream's ``NatsBroker`` makes and keeps the connection: the servers, the creds file and TLS,
the service's inbox prefix, reconnecting for ever, the error and close callbacks, and a drain on
close. What travels on it goes straight through nats-py: FastStream's publish path (two spans,
two metrics, its own headers and a uuid per message) cost ~170 us of CPU per publish, a quarter
of it; one producer span carries the trace into each message's headers instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol

import nats
from faststream.nats import NatsBroker
from faststream.security import BaseSecurity
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import PubAck
from nats.js.client import JetStreamContext
from opentelemetry import propagate, trace

from mesh_contracts import Contract, ContractError
from mesh_contracts import topology as topo
from mesh_contracts.registry import BY_TYPE
from mesh_kit import envelope as env
from mesh_kit import telemetry as tel
from mesh_kit.delivery import PermissionViolation
from mesh_kit.fair import PRIORITY
from mesh_kit.settings import ServiceSettings, StreamFull, tls_context
from mesh_kit.state import KV, bind
from mesh_kit.trust import Trust

log = logging.getLogger("mesh.bus")


class Transport(Protocol):
    """Where published bytes go: the NATS connection (``NatsTransport``), or the in-memory test
    bus (``mesh_testing.inmemory``), which hands them to the service's own consumers."""

    async def core(self, subject: str, body: bytes, headers: dict[str, str]) -> None: ...
    async def stream(
        self, subject: str, body: bytes, headers: dict[str, str], stream: str, timeout: float
    ) -> PubAck: ...


class NatsTransport:
    def __init__(self, nc: Callable[[], NATS]) -> None:
        self._nc = nc
        self._js_ctx: tuple[NATS, JetStreamContext] | None = None

    def js(self) -> JetStreamContext:
        """The JetStream context of the current connection (made once per connection)."""
        nc = self._nc()
        if self._js_ctx is None or self._js_ctx[0] is not nc:
            self._js_ctx = (nc, nc.jetstream())
        return self._js_ctx[1]

    async def core(self, subject: str, body: bytes, headers: dict[str, str]) -> None:
        await self._nc().publish(subject, body, headers=headers)

    async def stream(self, subject: str, body: bytes, headers: dict[str, str], stream: str, timeout: float) -> PubAck:
        return await self.js().publish(subject, body, headers=headers, stream=stream, timeout=timeout)


Stored = Callable[[str, str, str, bytes, dict[str, str]], None]
"""(tenant, stream, subject, body, headers) of a message this service stored (quotas count it)."""


class Connection:
    def __init__(
        self,
        settings: ServiceSettings,
        trust: Trust,
        tracer: trace.Tracer,
        count: Callable[..., None],
        *,
        security: BaseSecurity | None = None,
    ) -> None:
        self.settings, self.service, self.trust, self.tracer, self._count = (
            settings, settings.service, trust, tracer, count,
        )  # fmt: skip
        if security is None and settings.creds_file is not None:
            from faststream.nats import NatsCredentials

            security = NatsCredentials.from_file(
                str(settings.creds_file), ssl_context=tls_context(settings.tls_ca_file)
            )
        self.broker = NatsBroker(
            settings.nats_servers,
            name=settings.service,
            security=security,
            inbox_prefix=settings.inbox_prefix,
            error_cb=self._on_error,
            closed_cb=self._on_closed,
            graceful_timeout=settings.graceful_timeout_s,
            log_level=logging.DEBUG,
            max_reconnect_attempts=-1,
            apply_types=False,  # it runs no subscriber: nothing to inject
        )
        self.nats = NatsTransport(lambda: self.nc)
        self.transport: Transport = self.nats
        self.permission_errors: deque[str] = deque(maxlen=20)  # the latest few
        self.on_stored: Stored | None = None
        self.serving = False
        """Set by the mesh from start to stop: serving (ready); the server closing the connection means exiting."""
        self.lost = asyncio.Event()
        """Set when the server closed the connection for good (the client does not reconnect after
        an error such as a revoked user): the process should exit so a supervisor restarts it."""

    async def connect(self) -> None:
        await self.broker.connect()

    async def close(self) -> None:
        """Drain and close (what is in flight is delivered first)."""
        await self.broker.stop()

    @property
    def nc(self) -> NATS:
        return self.broker.connection

    @property
    def connected(self) -> bool:
        try:
            return bool(self.nc.is_connected)
        except (AttributeError, TypeError):  # not connected yet
            return False

    def js(self) -> JetStreamContext:
        return self.nats.js()

    async def kv(self, bucket: str) -> KV:
        """Bind a provisioned KV bucket (never creates it; see ``state.bind``)."""
        return bind(self.nc, bucket)

    async def _on_closed(self) -> None:
        if self.serving:
            self._count(tel.M_CONNECTION_LOST)
            log.error("NATS closed the connection for good (%s): exiting so a supervisor restarts the service",
                      getattr(self.nc, "last_error", None) or "no reason given")  # fmt: skip
            self.lost.set()

    async def _on_error(self, err: Exception) -> None:
        text = str(err)
        if "permissions violation" in text.lower():
            self._count(tel.M_PERMISSION_VIOLATIONS)
            self.permission_errors.append(text[:300])
            log.error("NATS refused an operation for %s: %s", self.service, text)
        else:
            log.warning("NATS error: %s", text)

    # --- publishing -----------------------------------------------------------------------

    async def publish(
        self,
        model: Contract,
        key: str,
        *,
        causation: str | None = None,
        timeout: float = 10.0,
        priority: int | None = None,
    ) -> PubAck | None:
        """Publish to JetStream with a deterministic id built from ``key`` (e.g. ``"s1:1"``);
        ``priority`` (0-9) orders it within its tenant's turn at a fair consumer. A contract
        that is not ``acked`` (progress events) goes onto its stream without waiting for the
        stream's answer (None): a core publish, still stored and deduplicated."""
        model, body = self._ours(model, "stream", "request()/serve()")
        msg_id = env.message_id(model.type, model.tenant, model.task_id, key)
        # Unless told otherwise, what a handler publishes was caused by the message it handles.
        headers = env.headers_for(self.trust.signer, model, body, msg_id, causation or env.CAUSE.get() or None)
        if priority is not None:
            headers[PRIORITY] = str(priority)
        subject = model.subject()
        with self.tracer.start_as_current_span(
            f"{subject} publish", kind=trace.SpanKind.PRODUCER,
            attributes={"messaging.system": "nats", "messaging.destination.name": subject},
        ):  # fmt: skip
            propagate.inject(headers)
            stream = topo.STREAMS[model.spec.domain]
            if not model.spec.acked:
                await self.transport.core(subject, body, headers)
                self._stored(model.tenant, stream, subject, body, headers)
                return None
            try:
                ack = await self.transport.stream(subject, body, headers, stream, timeout)
            except nats.errors.TimeoutError as exc:
                # A denied JetStream publish shows up only as a timeout; say which it was if we know.
                if self.permission_errors:
                    raise PermissionViolation(self.permission_errors[-1]) from exc
                raise
            except nats.js.errors.APIError as exc:
                full = StreamFull.of(exc, stream)
                if full is not None:
                    self._count(tel.M_STREAM_FULL, {"stream": full.stream or ""})
                    raise full from exc
                raise
            if not ack.duplicate:
                self._stored(model.tenant, stream, subject, body, headers)
            return ack

    def _stored(self, tenant: str, stream: str, subject: str, body: bytes, headers: dict[str, str]) -> None:
        if self.on_stored is not None:
            self.on_stored(tenant, stream, subject, body, headers)

    def _ours(self, model: Contract, transport: str, instead: str) -> tuple[Contract, bytes]:
        """The message as it is sent (stamped with the release of the task being handled) and its
        body, if it travels this way and this service is a declared producer of it."""
        if model.spec.transport != transport:
            raise TypeError(f"{model.type} is a {model.spec.transport} message; use {instead}")
        if self.service not in model.spec.producers:
            raise PermissionViolation(f"{self.service} is not a declared producer of {model.type}")
        model = env.stamped(model)
        return model, model.to_bytes()

    async def emit(self, model: Contract) -> None:
        """Fire-and-forget core-NATS publish of a live (``core``) message, signed like any other.

        Nothing is stored and nothing waits for an ack: a streamed token must reach a watching
        client as soon as it exists, and losing one when nobody listens is by design."""
        model, body = self._ours(model, "core", "publish()")
        msg_id = env.message_id(
            model.type, model.tenant, model.task_id, f"{getattr(model, 'call_id', '')}:{getattr(model, 'seq', 0)}"
        )
        await self.nc.publish(model.subject(), body, headers=env.headers_for(self.trust.signer, model, body, msg_id))

    async def request(self, model: Contract, *, timeout: float = 5.0) -> Contract:
        """Core request/reply; the reply is verified like any other message."""
        if model.spec.transport != "request":
            raise TypeError(f"{model.type} is not a request contract")
        model = env.stamped(model)
        body = model.to_bytes()
        msg_id = env.message_id(model.type, model.tenant, model.task_id, getattr(model, "call_id", "") or "")
        reply: Msg = await self.nc.request(
            model.subject(), body, timeout=timeout, headers=env.headers_for(self.trust.signer, model, body, msg_id)
        )
        rheaders = dict(reply.headers or {})
        schema = rheaders.get(env.SCHEMA, "")
        type_name, _, major = schema.partition("/v")
        cls = BY_TYPE.get((type_name, int(major) if major.isdigit() else -1))
        if cls is None or cls.spec.transport != "reply":
            raise ContractError(f"unexpected reply schema {schema!r} to {model.type}")
        answer = cls.parse(reply.data, strict=self.settings.strict_contracts)
        await self.trust.verify_current(
            lambda: self.trust.verifier.verify(rheaders.get(env.IDENTITY), reply.data, answer)
        )
        if (answer.tenant, answer.task_id) != (model.tenant, model.task_id):
            raise ContractError("reply names a different tenant/task than the request")
        return answer
