"""The mesh bus: one connection per service, signed publishes, verified durable consumers.

A service builds one ``Mesh`` and registers handlers with ``consume`` (JetStream durable
pull consumers that provisioning created) or ``serve`` (core request/reply). Every
message a handler sees has been parsed against its contract and its sender verified
against the trust bundle; everything else is dead-lettered with the reason.

Ack policy, explicitly: a handler that returns acks; one that raises ``Reject`` (or a
contract/identity failure) dead-letters and TERMs at once; any other exception NAKs with
a growing delay until ``MAX_DELIVER`` attempts, then dead-letters and TERMs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats
from cryptography.hazmat.primitives import serialization
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from faststream.security import BaseSecurity
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError
from nats.js.api import PubAck
from nats.js.client import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError
from opentelemetry import propagate, trace

from mesh_contracts import BodyError, Contract, ContractError, DecodeLimits, parse_message, split_subject
from mesh_contracts import topology as topo
from mesh_contracts.base import ID_PATTERN
from mesh_contracts.registry import BY_TYPE
from mesh_contracts.v1 import ProgressEvent
from mesh_kit import envelope as env
from mesh_kit import faults, wire
from mesh_kit import telemetry as tel
from mesh_kit.chain import AuditChain, Head
from mesh_kit.deps import Dependency, readiness
from mesh_kit.door import Door
from mesh_kit.fair import PRIORITY, FairConsumer, Fetched
from mesh_kit.guard import Guard
from mesh_kit.identity import IdentityError, Principal, Signer, TrustBundle, UnknownKey, Verifier, load_private_key
from mesh_kit.quota import Quotas, limits_from
from mesh_kit.settings import BROKER_UNAVAILABLE, ServiceSettings, StreamFull, tls_context
from mesh_kit.state import bind
from mesh_kit.throttle import Throttled

log = logging.getLogger("mesh.bus")
C = TypeVar("C", bound=Contract)
V = TypeVar("V")
FULL_PAUSE_S = 5.0
"""Longest wait between tries of a handler whose output a full stream refused."""
TRUST_RECHECK_S = 0.25
"""Least spacing of the trust-bundle reads made because a token named a key not known here."""


class Reject(Exception):
    """Raise from a handler for input that can never succeed: dead-letter now, no retry."""


class Retry(Exception):
    """Raise to have the message redelivered after ``delay_s`` without logging a failure
    (e.g. another replica is performing the same work right now)."""

    delay_s = 1.0


class Park(Exception):
    """Raise from a handler for a message it cannot take up yet (the planner's task waiting for a
    run slot): the message waits, alive and with no attempt spent, until ``until()`` returns, and
    is then handled again. At a fair consumer it waits out of the handlers' way (they take other
    work meanwhile); otherwise its handler holds it."""

    def __init__(self, until: Callable[[], Awaitable[None]], reason: str = "") -> None:
        super().__init__(reason or "waits to be taken up")
        self.until = until


class PermissionViolation(RuntimeError):
    """The broker refused an operation this identity is not allowed to do."""


@dataclass
class Delivery:
    """What a handler gets besides the model: sender, ids, and the delivery's controls."""

    mesh: Mesh
    sender: Principal
    subject: str
    msg_id: str
    deliveries: int
    headers: dict[str, str]
    _msg: NatsMessage | Fetched | None = None
    seq: int = 0
    stored_at: float | None = None
    """When JetStream stored the message (None for core request/reply)."""
    body: bytes = b""
    """The message's body as it arrived (and as its sender signed it)."""

    @property
    def owner(self) -> str:
        """Identity of the message (not of this delivery): its subject and stream sequence."""
        return f"{self.subject}@{self.seq}"

    async def heartbeat(self) -> None:
        """Tell JetStream the handler is alive (extends ``ack_wait`` for long model calls)."""
        if self._msg is not None:
            await self._msg.in_progress()

    @contextlib.asynccontextmanager
    async def keepalive(self, every_s: float | None = None) -> AsyncIterator[None]:
        """Heartbeat every third of ``ack_wait`` while the block runs, so a long call keeps its
        message instead of having it redelivered to another replica mid-call."""
        every = every_s or self.mesh.settings.ack_wait_s / 3

        async def beat() -> None:
            while True:
                await asyncio.sleep(every)
                try:
                    await self.heartbeat()
                except nats.errors.Error as exc:  # the broker is away: the next beat may reach it
                    log.debug("heartbeat for %s not sent: %s", self.subject, exc)

        task = asyncio.create_task(beat()) if self._msg is not None else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


Handler = Callable[[Any, Delivery], Awaitable[None]]
RequestHandler = Callable[[Any, Delivery], Awaitable[Contract]]
RejectHook = Callable[[str, str, str, str], Awaitable[None]]  # (tenant, task, subject, reason)


@dataclass
class Stats:
    counters: Counter[str] = field(default_factory=Counter)
    permission_errors: deque[str] = field(default_factory=lambda: deque(maxlen=20))  # the latest few
    started_at: float = field(default_factory=time.time)


class Mesh:
    """A service's connection to the mesh."""

    def __init__(
        self,
        settings: ServiceSettings,
        telemetry: tel.Telemetry | None = None,
        *,
        signer: Signer | None = None,
        verifier: Verifier | None = None,
        security: BaseSecurity | None = None,
    ) -> None:
        wire.install()  # every received message's headers: nats-py's parser, without its generator
        self.settings = settings
        self.service = settings.service
        self.telemetry = telemetry or tel.setup(settings.service)
        self._key_file_state = _file_state(settings.signing_key_file) if signer is None else None
        self.signer = signer or Signer.from_file(settings.service, settings.signing_key_file, settings.token_ttl_s)
        self.verifier = verifier or Verifier(TrustBundle.from_file(settings.trust_bundle_file))
        self.stats = Stats()
        self.tracer = self.telemetry.tracer_provider.get_tracer("mesh_kit")
        self._meter = self.telemetry.meter_provider.get_meter("mesh_kit")
        self._counters: dict[str, Any] = {}  # created on first use; names come from mesh_kit.telemetry
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
            middlewares=(
                NatsTelemetryMiddleware(
                    tracer_provider=self.telemetry.tracer_provider, meter_provider=self.telemetry.meter_provider
                ),
            ),
            log_level=logging.DEBUG,  # per-message logs stay off the hot path at INFO
            max_reconnect_attempts=-1,
            # No dependency injection: every handler takes the message itself (see _the_message).
            # FastStream resolves an injected ``NatsMessage`` argument with a synchronous
            # function, which fast_depends runs in a worker thread: one thread hop per message,
            # and a GIL handed back and forth with the event loop on every socket write.
            apply_types=False,
        )
        self._started = False
        self._js_ctx: tuple[NATS, JetStreamContext] | None = None
        self._served: list[tuple[str, Callable[[Msg], Awaitable[None]], bool]] = []
        """``serve`` handlers: (subject pattern, entry), subscribed by ``start``."""
        self._serving: list[Any] = []
        self._answering: set[asyncio.Task[None]] = set()
        self._direct = False
        """Publish with nats-py itself (set by ``start``, once connected to a real server)."""
        self.guard: Guard | None = None
        self._on_start: list[Callable[[], Awaitable[None]]] = []
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self._on_stop_connected: list[Callable[[], Awaitable[None]]] = []
        self._identity_tasks: list[asyncio.Task[None]] = []
        self._trust_kv: Any = None  # the ``trust`` bucket, once followed
        self._trust_lock = asyncio.Lock()
        self._trust_read_at = float("-inf")  # monotonic start of the last read on an unknown key
        self._fair: list[FairConsumer] = []
        self._durables: list[topo.Durable] = []  # every durable ``consume`` bound, in order
        self._doors: list[topo.Door] = []  # the doors of the tenant-written contracts it consumes
        self._door: Door | None = None
        self._quota_flush: asyncio.Task[None] | None = None
        self.quotas: Quotas | None = None
        """What each tenant made this service store (``mesh_kit.quota``): its doors and its dead
        letters charge it. Set by ``start`` (None under the in-memory test broker: no quotas)."""
        self.waiting_for: str = ""  # why start() is waiting (a durable not provisioned yet)
        self.dependencies: dict[str, Dependency] = {}
        self.reports: dict[str, Callable[[], Any]] = {}
        """Backing services besides NATS (Redis), probed in the background; see ``depend``."""
        self._chain: AuditChain | None = None
        self._genai: tel.GenAIMetrics | None = None
        self.limits = DecodeLimits(
            max_bytes=settings.decode_max_bytes,
            max_depth=settings.decode_max_depth,
            max_int_digits=settings.decode_max_int_digits,
        )
        self.rejections = Throttled(log, settings.rejection_log_per_min)
        self._creds_file_state = _file_state(settings.creds_file) if settings.creds_file else None
        self.lost = asyncio.Event()
        """Set when the server closed the connection for good (the client does not reconnect after
        an error such as a revoked user): the process should exit so a supervisor restarts it."""

    @property
    def meter(self) -> Any:
        """The service's OTel meter, for instruments with their own attributes (histograms)."""
        return self._meter

    @property
    def genai(self) -> tel.GenAIMetrics:
        """The OTel GenAI client histograms (token usage, operation duration) of this service."""
        if self._genai is None:
            self._genai = tel.GenAIMetrics(self._meter)
        return self._genai

    def count(self, name: str, attributes: dict[str, str] | None = None) -> None:
        """Both views of one count: the OTel metric (exported; with ``attributes`` besides the
        service) and /status (local, instant; the total)."""
        self.stats.counters[name] += 1
        if name not in self._counters:
            self._counters[name] = self._meter.create_counter(name, unit="{event}")
        self._counters[name].add(1, {"service": self.service, **(attributes or {})})

    async def audit(
        self, tenant: str, task_id: str, kind: str, key: str, *, actor: str = "", source: str = "",
        detail: dict[str, Any] | None = None,
    ) -> int:  # fmt: skip
        """Append a decision to the tenant's tamper-evident audit chain (``mesh_kit.chain``); ``key``
        names the decision, so a retry of it is stored once. Returns its position (0: a retry)."""
        return await self.chain.append(tenant, task_id, kind, key, actor=actor, source=source, detail=detail)

    async def audit_head(self, tenant: str) -> Head:
        """Where the tenant's audit chain ends now (read from the stream)."""
        return await self.chain.head(tenant)

    @property
    def chain(self) -> AuditChain:
        """This service's appender to the tenants' audit chains (created on first use)."""
        if self._chain is None:
            self._chain = AuditChain(lambda: self.nc, lambda: self.signer, self.tracer)
        return self._chain

    # --- lifecycle -------------------------------------------------------------------------

    def enable_guard(self) -> Guard:
        """Check halt / cancel / kill switches before every model or tool call (``mesh.guard``)."""
        if self.guard is None:
            self.guard = Guard(self)
            self.on_start(self.guard.start)
        return self.guard

    def on_start(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run ``hook`` after connecting and before any handler can be called (e.g. bind KV)."""
        self._on_start.append(hook)

    def on_stop(self, hook: Callable[[], Awaitable[None]], *, connected: bool = False) -> None:
        """Run ``hook`` after the broker has drained (e.g. close a Redis client); ``connected``:
        before it closes, once requests are no longer answered and the fetched messages are
        handled (e.g. a last write to a stream or bucket)."""
        (self._on_stop_connected if connected else self._on_stop).append(hook)

    def report(self, name: str, source: Callable[[], Any]) -> None:
        """Add ``name: source()`` to this service's /status JSON (e.g. the budget's per-tenant queue)."""
        self.reports[name] = source

    def depend(self, dependency: Dependency) -> Dependency:
        """Track a backing service: probed every few seconds from start to stop, in ``ready()``
        (a required one down makes the service not ready) and in /status."""

        def changed(d: Dependency) -> None:
            if not d.up:
                self.count(tel.M_DEPENDENCY_DOWN, {"dependency": d.name})

        dependency.on_change = changed
        self.dependencies[dependency.name] = dependency
        return dependency

    async def start(self) -> None:
        await self.broker.connect()
        self._direct = True
        await self._until_provisioned()
        s = self.settings
        self.quotas = Quotas(
            lambda: self.nc, await self.kv("quotas"), self.service,
            limits_from(s.quota_share, s.quota_mib_per_min, s.quota_tenants),
        )  # fmt: skip
        await self._follow_identity()
        for hook in self._on_start:
            await hook()
        for dependency in self.dependencies.values():
            await dependency.check()  # the first /readyz already knows
            dependency.start()
        await self.broker.start()
        await self._serve()
        if self._doors:
            self._door = Door(self, self._doors)
            await self._door.start()
        self._quota_flush = asyncio.create_task(self.quotas.run(), name="quota-flush")
        for consumer in self._fair:
            await consumer.start()
        self._started = True

    async def _until_provisioned(self) -> None:
        """Wait until every durable this service consumes exists, not ready meanwhile.

        Streams and durables are made by ``meshctl provision`` (the provisioning Job), never by
        a service. A service started first (every object of a release applied at once, or NATS
        restored empty) used to either exit (FastStream's bind fails) or, with the fair
        consumer, report ready while consuming nothing, for good. Now it waits here, says why
        on /readyz and in its log, and starts once provisioning is done: the rollout converges
        whatever the order. Any error but "not found" (a permission violation) still fails."""
        js = self.nc.jetstream()
        pause, since = 0.25, time.monotonic()
        for durable in self._durables:
            while True:
                try:
                    await js.consumer_info(durable.stream, durable.name)
                    break
                except NotFoundError as exc:
                    reason = (
                        f"waiting for provisioning: durable {durable.name} on stream {durable.stream} "
                        f"not found ({exc.description or 'not found'}); run `meshctl provision` (the provisioning Job)"
                    )
                    if reason != self.waiting_for:
                        log.warning("%s", reason)
                        self.waiting_for = reason
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 5.0)
        if self.waiting_for:
            log.info("provisioned after %.1fs of waiting: starting", time.monotonic() - since)
            self.waiting_for = ""

    async def stop(self) -> None:
        """Stop fetching, let in-flight handlers finish (graceful timeout), then drain."""
        self._started = False
        for task in self._identity_tasks:
            task.cancel()
        await self._stop_serving()
        if self._door is not None:
            await self._door.stop()
        if self._quota_flush is not None:
            self._quota_flush.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._quota_flush
        for consumer in self._fair:
            await consumer.stop()
        if self.quotas is not None:
            with contextlib.suppress(Exception):
                await self.quotas.flush()  # what it stored for tenants since their last charge
        for hook in self._on_stop_connected:
            try:
                await hook()
            except Exception:  # the connection still closes, and the other hooks run
                log.exception("a stop hook failed while connected")
        await self.broker.stop()
        for dependency in self.dependencies.values():
            await dependency.stop()
        for hook in self._on_stop:
            await hook()

    # --- identity that changes while running (rotation, revocation) -----------------------------

    async def _follow_identity(self) -> None:
        """Keep the trust bundle and this service's signing key current without a restart: the
        operator publishes each new bundle, signed, in KV ``trust`` (accepted only if the current
        bundle's operator signed it and it is newer); a rotated signing key is picked up from its
        file once the bundle trusts it. NATS credentials need nothing here: the client reads its
        creds file on every reconnect, and revoking the old user makes it reconnect."""
        kv = entry = None
        try:
            kv = await self.kv(topo.TRUST_BUCKET)
            entry = await kv.get(topo.TRUST_KEY)
        except KeyNotFoundError:
            log.debug("no trust bundle published yet: the file's bundle stands")
        except Exception as exc:  # noqa: BLE001 - no bucket (older provisioning) or no permission
            log.warning("cannot follow published trust bundles (%s): the file's bundle stands", exc)
        if entry is not None and entry.value:
            self._accept_bundle(entry.value)
        if kv is not None:
            self._trust_kv = kv
            self._identity_tasks.append(asyncio.create_task(self._watch_trust(kv)))
        if self._key_file_state is not None:
            self._identity_tasks.append(asyncio.create_task(self._watch_key()))

    def _accept_bundle(self, document: bytes) -> bool:
        try:
            new = self.verifier.bundle.accept(document, self.verifier.leeway_s)
        except IdentityError as exc:
            if "not newer" not in str(exc):
                self.count(tel.M_TRUST_REFUSED)
                log.error("refused a published trust bundle: %s", exc)
            return False
        self.verifier.bundle = new
        self.count(tel.M_TRUST_UPDATED)
        log.info("trust bundle revision %d in force", new.revision)
        self._reload_key()
        return True

    async def _newer_trust(self, failed_at: float) -> bool:
        """After a token failed with ``UnknownKey`` at ``failed_at`` (monotonic): read the published
        bundle and say whether a newer one is now in force. A rotation publishes the bundle before
        anyone signs with the new key, but a process may see a message signed with it before its
        own copy of the bundle arrives (it was reconnecting when the write went by, and re-reads
        only every ``identity_refresh_s``). Reads are coalesced and spaced: one read answers every
        failure that happened before it started, and the next waits ``TRUST_RECHECK_S`` after it,
        so a flood of forged tokens costs a few reads a second, not one each."""
        if self._trust_kv is None:
            return False
        before = self.verifier.bundle
        async with self._trust_lock:
            if self.verifier.bundle is not before:
                return True
            if self._trust_read_at >= failed_at:
                return False  # a read that started after this failure found nothing newer
            pause = self._trust_read_at + TRUST_RECHECK_S - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            self._trust_read_at = time.monotonic()
            try:
                entry = await asyncio.wait_for(self._trust_kv.get(topo.TRUST_KEY), 2.0)
            except Exception as exc:  # noqa: BLE001 - no bundle published, or the broker is away
                log.debug("trust bundle read on an unknown key failed (%s)", exc)
                return False
            if entry is not None and entry.value:
                self._accept_bundle(entry.value)
        return self.verifier.bundle is not before

    async def newest_trust(self) -> TrustBundle:
        """The trust bundle as last published, read now (one get), for a decision that must not
        rest on a copy that may be a moment old: whom a tenant has named to approve its calls, or
        removed. Without a published bundle (or a ``trust`` bucket) the bundle in force is it; a
        failed read raises, so the decision is retried rather than taken on old trust."""
        if self._trust_kv is not None:
            try:
                entry = await asyncio.wait_for(self._trust_kv.get(topo.TRUST_KEY), 2.0)
            except KeyNotFoundError:
                entry = None
            if entry is not None and entry.value:
                self._accept_bundle(entry.value)
        return self.verifier.bundle

    async def verify_current(self, check: Callable[[], V]) -> V:
        """``check()`` (a verification against ``self.verifier``), judged again under the newest
        published bundle if it failed on a key this process does not know yet. Every message the
        mesh hands a handler went through it; a handler verifying what a message carries (a
        record signed by another service) uses it too."""
        try:
            return check()
        except UnknownKey:
            if not await self._newer_trust(time.monotonic()):
                raise
            self.count(tel.M_TRUST_CAUGHT_UP)
        return check()

    async def _watch_trust(self, kv: Any) -> None:
        """Every write of the bundle reaches this service at once on a core subscription to its
        key's subject (the document itself, accepted only if the current bundle's operator
        signed it and it is newer); a re-read every ``identity_refresh_s`` catches a write made
        while this service was disconnected. No consumer: a service holds no consumer rights."""

        async def on_write(msg: Msg) -> None:
            if msg.data:  # a deletion marker has no body
                self._accept_bundle(msg.data)

        sub = None
        try:
            while True:
                try:
                    if sub is None:
                        sub = await self.nc.subscribe(f"$KV.{topo.TRUST_BUCKET}.{topo.TRUST_KEY}", cb=on_write)
                    entry = await kv.get(topo.TRUST_KEY)
                    if entry is not None and entry.value:
                        self._accept_bundle(entry.value)
                except KeyNotFoundError:
                    pass
                except Exception as exc:  # noqa: BLE001 - the broker went away (or a reconnect): read again
                    log.debug("trust bundle re-read failed (%s); trying again", exc)
                await asyncio.sleep(self.settings.identity_refresh_s)
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _watch_key(self) -> None:
        while True:
            await asyncio.sleep(self.settings.identity_refresh_s)
            self._reload_key()
            await self._reload_creds()

    async def _reload_creds(self) -> None:
        """Reconnect as the new NATS user as soon as a rotation replaced the creds file (the client
        reads the file on every connect), before the old user is revoked: a revoked connection is
        closed by the server for good, a reconnect on our own initiative costs nothing."""
        if self._creds_file_state is None or self.settings.creds_file is None:
            return
        state = _file_state(self.settings.creds_file)
        if state is None or state == self._creds_file_state:
            return
        self._creds_file_state = state
        try:
            await self.nc.force_reconnect()
        except (AttributeError, nats.errors.Error) as exc:
            log.warning("could not reconnect with the rotated credentials yet (%s)", exc)
            self._creds_file_state = None
            return
        self.count(tel.M_CREDS_ROTATED)
        log.info("reconnected with the rotated NATS credentials")

    def _reload_key(self) -> None:
        """Sign with the key in the signing-key file once it changed *and* the bundle trusts it (a
        key written before its bundle is published waits; the old key keeps signing meanwhile)."""
        if self._key_file_state is None:
            return
        state = _file_state(self.settings.signing_key_file)
        if state == self._key_file_state or state is None:
            return
        try:
            key = load_private_key(self.settings.signing_key_file)
        except (OSError, ValueError, IdentityError) as exc:
            log.warning("signing key file unreadable (%s); still signing with the current key", exc)
            return
        principal = self.verifier.bundle.principals.get(self.service)
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        trusted = principal is not None and any(
            k.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == public
            for k in principal.active()
        )
        if not trusted:
            return  # not in the bundle yet: keep the old key until it is
        self.signer = Signer(self.service, key, self.settings.token_ttl_s)
        self._key_file_state = state
        self.count(tel.M_KEY_ROTATED)
        log.info("signing with the rotated key")

    @property
    def nc(self) -> NATS:
        return self.broker.connection

    def ready(self) -> tuple[bool, str]:
        if self.lost.is_set():
            return False, "connection to NATS closed by the server"
        if not self._started:
            return False, self.waiting_for or "not started"
        if self.stats.permission_errors:
            return (
                False,
                f"{self.stats.counters[tel.M_PERMISSION_VIOLATIONS]} permission violation(s): "
                f"{self.stats.permission_errors[-1]}",
            )
        try:
            connected = self.nc.is_connected
        except (AttributeError, TypeError):  # broker not connected yet
            connected = False
        if not connected:
            return False, "not connected to NATS"
        return readiness(self.dependencies)

    async def _on_closed(self) -> None:
        if self._started:
            self.count(tel.M_CONNECTION_LOST)
            log.error("NATS closed the connection for good (%s): exiting so a supervisor restarts the service",
                      getattr(self.nc, "last_error", None) or "no reason given")  # fmt: skip
            self.lost.set()

    async def _on_error(self, err: Exception) -> None:
        text = str(err)
        if "permissions violation" in text.lower():
            self.count(tel.M_PERMISSION_VIOLATIONS)
            self.stats.permission_errors.append(text[:300])
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
        if model.spec.transport != "stream":
            raise TypeError(f"{model.type} is a {model.spec.transport} message; use request()/serve()")
        if self.service not in model.spec.producers:
            raise PermissionViolation(f"{self.service} is not a declared producer of {model.type}")
        model = env.stamped(model)
        body = model.to_bytes()
        msg_id = env.message_id(model.type, model.tenant, model.task_id, key)
        # Unless told otherwise, what a handler publishes was caused by the message it handles.
        headers = env.headers_for(self.signer, model, body, msg_id, causation or env.CAUSE.get() or None)
        if priority is not None:
            headers[PRIORITY] = str(priority)
        subject = model.subject()
        # Straight to nats-py, not through the broker: FastStream's publish path (two spans, two
        # metrics, its own headers and a uuid per message) cost ~170 us of CPU per publish, a
        # quarter of it. One producer span carries the trace into the message's headers.
        with self.tracer.start_as_current_span(
            f"{subject} publish", kind=trace.SpanKind.PRODUCER,
            attributes={"messaging.system": "nats", "messaging.destination.name": subject},
        ):  # fmt: skip
            propagate.inject(headers)
            stream = topo.STREAMS[model.spec.domain]
            if self._direct and not model.spec.acked:
                await self.nc.publish(subject, body, headers=headers)
                self._stored_for(model.tenant, stream, subject, body, headers)
                return None
            try:
                if self._direct:
                    ack = await self._js().publish(subject, body, headers=headers, stream=stream, timeout=timeout)
                    if not ack.duplicate:
                        self._stored_for(model.tenant, stream, subject, body, headers)
                    return ack
                # Not connected by ``start`` (FastStream's in-memory test broker drives this mesh).
                return await self.broker.publish(body, subject, headers=headers, stream=stream, timeout=timeout)
            except nats.errors.TimeoutError as exc:
                # A denied JetStream publish shows up only as a timeout; say which it was if we know.
                if self.stats.permission_errors:
                    raise PermissionViolation(self.stats.permission_errors[-1]) from exc
                raise
            except nats.js.errors.APIError as exc:
                full = StreamFull.of(exc, topo.STREAMS[model.spec.domain])
                if full is not None:
                    self.count(tel.M_STREAM_FULL, {"stream": full.stream or ""})
                    raise full from exc
                raise

    def _stored_for(self, tenant: str, stream: str, subject: str, body: bytes, headers: dict[str, str]) -> None:
        """What this service stored for a tenant counts against the tenant's share of the stream
        (``Quotas.induced``; counted here, written every few seconds): its doors refuse a tenant
        whose tasks made the mesh store too much anywhere."""
        if self.quotas is not None:
            size = len(subject) + len(body) + sum(len(k) + len(v) + 4 for k, v in headers.items())
            self.quotas.induced(tenant, stream, size)

    def _js(self) -> JetStreamContext:
        """The JetStream context of the current connection (made once per connection)."""
        nc = self.nc
        if self._js_ctx is None or self._js_ctx[0] is not nc:
            self._js_ctx = (nc, nc.jetstream())
        return self._js_ctx[1]

    async def emit(self, model: Contract) -> None:
        """Fire-and-forget core-NATS publish of a live (``core``) message, signed like any other.

        Nothing is stored and nothing waits for an ack: a streamed token must reach a watching
        client as soon as it exists, and losing one when nobody listens is by design."""
        if model.spec.transport != "core":
            raise TypeError(f"{model.type} is a {model.spec.transport} message; use publish()")
        if self.service not in model.spec.producers:
            raise PermissionViolation(f"{self.service} is not a declared producer of {model.type}")
        model = env.stamped(model)
        body = model.to_bytes()
        msg_id = env.message_id(
            model.type, model.tenant, model.task_id, f"{getattr(model, 'call_id', '')}:{getattr(model, 'seq', 0)}"
        )
        await self.nc.publish(model.subject(), body, headers=env.headers_for(self.signer, model, body, msg_id))

    async def progress(
        self,
        tenant: str,
        task_id: str,
        stage: str,
        message: str = "",
        *,
        step_id: str = "",
        key: str = "",
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Publish a progress event for clients following the task (deduplicated by stage/step/key)."""
        await self.publish(
            ProgressEvent(
                tenant=tenant,
                task_id=task_id,
                source=self.service,
                stage=stage,
                message=message,
                step_id=step_id,
                detail=detail or {},
            ),
            key=f"{self.service}:{stage}:{step_id}:{key}",
        )

    async def request(self, model: Contract, *, timeout: float = 5.0) -> Contract:
        """Core request/reply; the reply is verified like any other message."""
        if model.spec.transport != "request":
            raise TypeError(f"{model.type} is not a request contract")
        model = env.stamped(model)
        body = model.to_bytes()
        msg_id = env.message_id(model.type, model.tenant, model.task_id, getattr(model, "call_id", "") or "")
        reply = await self.nc.request(
            model.subject(), body, timeout=timeout, headers=env.headers_for(self.signer, model, body, msg_id)
        )
        rheaders = dict(reply.headers or {})
        schema = rheaders.get(env.SCHEMA, "")
        type_name, _, major = schema.partition("/v")
        cls = BY_TYPE.get((type_name, int(major) if major.isdigit() else -1))
        if cls is None or cls.spec.transport != "reply":
            raise ContractError(f"unexpected reply schema {schema!r} to {model.type}")
        answer = cls.parse(reply.data, strict=self.settings.strict_contracts)
        await self.verify_current(lambda: self.verifier.verify(rheaders.get(env.IDENTITY), reply.data, answer))
        if (answer.tenant, answer.task_id) != (model.tenant, model.task_id):
            raise ContractError("reply names a different tenant/task than the request")
        return answer

    # --- consuming ------------------------------------------------------------------------

    def consume(
        self,
        contract: type[C],
        handler: Callable[[C, Delivery], Awaitable[None]],
        *,
        max_workers: int | None = None,
        on_reject: RejectHook | None = None,
    ) -> None:
        """Bind ``handler`` to this service's pre-provisioned durable for ``contract``.

        ``on_reject(tenant, task, subject, reason)`` runs whenever this durable gives up on a
        message: rejected on arrival (contract or identity), rejected by the handler, or
        dead-lettered after its last attempt. The task's owner uses it to tell the client.
        A contract tenants write (``topology.doors``) is handed in at this service's door, which
        ``start`` opens: checked, charged to the tenant's quota, then stored."""
        durable = topo.durable_for(self.service, contract)
        self._durables.append(durable)
        door = topo.door_of(contract)
        if door is not None and door.service == self.service and door not in self._doors:
            self._doors.append(door)  # tenants hand it in here (``mesh_kit.door``)
        workers = max_workers or self.settings.max_workers
        prefix = (self.settings.inbox_prefix + ".").encode()

        async def entry(msg: NatsMessage | Fetched) -> None:
            await self._dispatch(msg, durable, handler, on_reject)

        async def fetched(msg: NatsMessage | Fetched) -> None:
            # What FastStream's telemetry middleware does for its own subscriber: the handling runs
            # inside the producer's trace (its context travels in the message's headers).
            raw = msg.raw_message
            parent = propagate.extract(dict(raw.headers or {}))
            with self.tracer.start_as_current_span(
                f"{raw.subject} process", context=parent, kind=trace.SpanKind.CONSUMER,
                attributes={"messaging.system": "nats", "messaging.destination.name": raw.subject},
            ):  # fmt: skip
                await self._dispatch(msg, durable, handler, on_reject)

        if self.settings.fair_window > 0:
            # Fetch ahead and take the tenants in turn (``mesh_kit.fair``), not the stored order.
            self._fair.append(
                FairConsumer(
                    lambda: self.nc,
                    durable.stream,
                    durable.name,
                    self.settings.inbox_prefix + ".",
                    fetched,
                    workers=workers,
                    window=self.settings.fair_window,
                    ack_wait_s=self.settings.ack_wait_s,
                    graceful_s=self.settings.graceful_timeout_s,
                )
            )
            return

        entry.__name__ = f"{durable.name.replace('-', '_')}"
        self.broker.subscriber(
            durable.filter_subject,
            stream=JStream(durable.stream, declare=False),
            durable=durable.name,
            # batch_size=1: with FastStream 0.7.8 + nats-py 2.16 an idle multi-message fetch raises
            # asyncio.TimeoutError, which FastStream does not suppress (it restarts the loop with an
            # ERROR traceback). One-message fetches raise the nats TimeoutError it does suppress;
            # max_workers still gives concurrency.
            pull_sub=PullSub(batch_size=1, timeout=5.0),
            ack_policy=AckPolicy.MANUAL,
            inbox_prefix=prefix,
            max_workers=workers if workers > 1 else None,
            decoder=_the_message,  # the body is decoded once, by the mesh, with limits (_dispatch)
        )(entry)

    async def _dispatch(
        self, msg: NatsMessage | Fetched, durable: topo.Durable, handler: Handler, on_reject: RejectHook | None
    ) -> None:
        raw: Msg = msg.raw_message
        headers = dict(raw.headers or {})
        try:
            md = raw.metadata
            deliveries, stored_at, seq = md.num_delivered, md.timestamp.timestamp(), md.sequence.stream
        except NotJSMessageError:  # in-memory test broker
            deliveries, stored_at, seq = 1, None, 0
        msg_id = headers.get(env.MSG_ID, "")
        try:
            # a verified re-drive is judged (and, if it fails again, recorded) at its original's time
            stored_at, bound_id = self._redrive(raw.subject, raw.data, headers, msg_id, stored_at)
            model = parse_message(raw.subject, raw.data, strict=self.settings.strict_contracts, limits=self.limits)
            sender = await self.verify_current(
                lambda: self.verifier.verify_with_facts(
                    headers.get(env.IDENTITY), raw.data, model, headers.get(env.FACTS), at=stored_at, msg_id=bound_id
                )
            )
        except (ContractError, IdentityError) as exc:
            self.count(tel.M_REJECTED)
            reason = _rejection(exc)
            self.rejections.warn(f"rejected {raw.subject} seq={seq}: {reason}")
            await self._give_up(msg, durable, "rejected", reason, (deliveries, seq, stored_at), on_reject)
            return

        delivery = Delivery(
            self, sender, raw.subject, headers.get(env.MSG_ID, ""), deliveries, headers, msg, seq, stored_at, raw.data
        )
        if deliveries > 1:
            self.count(tel.M_REDELIVERED)
        with self.tracer.start_as_current_span(f"handle {model.type}") as span:
            span.set_attributes({tel.A_TENANT: model.tenant, tel.A_TASK: model.task_id, tel.A_MSG_TYPE: model.type})
            if model.release:
                span.set_attribute(tel.A_RELEASE, model.release)
            try:
                faults.poison_point(raw.data)
                cause = env.CAUSE.set(msg_id)
                release = env.RELEASE.set((model.tenant, model.task_id, model.release) if model.release else None)
                try:
                    await self._run(handler, model, delivery)
                finally:
                    env.RELEASE.reset(release)
                    env.CAUSE.reset(cause)
            except Park as exc:
                if isinstance(msg, Fetched) and msg.park(exc.until):
                    log.debug("%s parked: %s", raw.subject, exc)
                    return  # the consumer holds it, unacknowledged, and queues it again
                raise RuntimeError("a parked message reached a consumer that cannot hold it") from exc
            except Reject as exc:
                self.count(tel.M_DEAD_LETTERED)
                reason = f"rejected by handler: {exc}"
                await self._give_up(msg, durable, "failed", reason, (deliveries, seq, stored_at), on_reject)
                return
            except asyncio.CancelledError:
                raise
            except Retry as exc:
                log.debug("%s: %s; redelivering in %.1fs", raw.subject, exc, exc.delay_s)
                await msg.nack(delay=exc.delay_s)
                return
            except Exception as exc:  # noqa: BLE001 - any handler bug must become a retry, then the DLQ
                span.record_exception(exc)
                reason = f"{type(exc).__name__}: {exc}"
                if deliveries >= self.settings.max_deliver:
                    self.count(tel.M_DEAD_LETTERED)
                    log.error("giving up on %s after %d attempts: %s", raw.subject, deliveries, reason)
                    await self._give_up(
                        msg, durable, "failed", reason, (deliveries, seq, stored_at), on_reject,
                        told=f"failed {deliveries} attempts: {reason}",
                    )  # fmt: skip
                else:
                    self.count(tel.M_RETRIED)
                    delays = self.settings.retry_delays_s or (1.0,)
                    delay = delays[min(deliveries, len(delays)) - 1]
                    log.warning(
                        "attempt %d of %s failed (%s); retrying in %.1fs", deliveries, raw.subject, reason, delay
                    )
                    await msg.nack(delay=delay)
                return
        self.count(tel.M_HANDLED)
        await msg.ack()

    def _redrive(
        self, subject: str, body: bytes, headers: dict[str, str], msg_id: str, stored_at: float | None
    ) -> tuple[float | None, str]:
        """When and under which message id a message's token is judged: when it was stored, under
        the id it arrived with; for a dead letter an operator re-drove, at the time its original
        was first stored, under the original's id, as the operator's signed statement says.
        Re-drive headers without a valid statement are an ``IdentityError``: whoever can publish
        on a subject must not be able to stretch a captured token's lifetime."""
        if not any(h in headers for h in (env.REDRIVE, env.REDRIVE_OF, env.ORIGINAL_STORED_AT)):
            return stored_at, msg_id
        try:
            statement = self.verifier.redrive(
                headers.get(env.REDRIVE), subject=subject, body=body, msg_id=msg_id, at=stored_at
            )
        except IdentityError as exc:
            raise IdentityError(f"re-drive: {exc}") from None
        return min(statement.at, stored_at) if stored_at is not None else statement.at, statement.original_msg_id

    async def _run(self, handler: Handler, model: Contract, delivery: Delivery) -> None:
        """Run ``handler``; while the broker is unavailable, run it again in place rather than
        spend one of the message's attempts (those are for failures of the message itself: a
        failover must not dead-letter good work). Handlers are idempotent (compare-and-set
        records, ledger-guarded effects), so a re-run is what a redelivery would be. The
        message is kept alive with heartbeats meanwhile; after ``infra_retry_s`` the failure
        counts as an attempt after all."""
        deadline = time.monotonic() + self.settings.infra_retry_s
        pause, beating, full_logged = 0.1, False, False
        async with contextlib.AsyncExitStack() as stack:
            while True:
                try:
                    await handler(model, delivery)
                    return
                except Park as exc:
                    if isinstance(delivery._msg, Fetched) and delivery._msg.consumer is not None:
                        raise  # the fair consumer parks it (_dispatch)
                    # No fair consumer (MESH_FAIR_WINDOW=0): the message waits here, alive, and
                    # holds its handler meanwhile; then it is handled again.
                    if not beating:
                        await stack.enter_async_context(delivery.keepalive())
                        beating = True
                    await exc.until()
                    deadline = time.monotonic() + self.settings.infra_retry_s
                except StreamFull as exc:
                    # Backpressure: a stream this handler writes to is at its cap. The message
                    # waits here, alive and not spending attempts, for as long as that lasts
                    # (a bounded store refuses new work; it must not fail work in hand), and this
                    # handler slot with it, so the service takes no more until there is room.
                    if not beating:
                        await stack.enter_async_context(delivery.keepalive())
                        beating = True
                    if pause >= 2.0 or not full_logged:
                        log.warning("%s: %s; holding it until there is room", delivery.subject, exc)
                        full_logged = True
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, FULL_PAUSE_S)
                    deadline = time.monotonic() + self.settings.infra_retry_s  # time held is not an outage
                except BROKER_UNAVAILABLE as exc:
                    if time.monotonic() + pause > deadline:
                        raise
                    if not beating:
                        await stack.enter_async_context(delivery.keepalive())
                        beating = True
                    self.count(tel.M_INFRA_RETRIED)
                    log.info("%s: broker unavailable (%s); re-running in %.1fs", delivery.subject, exc, pause)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 2.0)

    async def _give_up(
        self,
        msg: NatsMessage | Fetched,
        durable: topo.Durable,
        kind: str,
        reason: str,
        where: tuple[int, int, float | None],
        on_reject: RejectHook | None,
        *,
        told: str = "",
    ) -> None:
        """Dead-letter the message, tell the durable's ``on_reject`` hook (``told``, or the
        reason), and stop its redelivery."""
        raw: Msg = msg.raw_message
        await self._dead_letter(raw, dict(raw.headers or {}), durable, kind, reason, where)
        if on_reject is not None:
            try:
                parts = split_subject(raw.subject)
            except ContractError:
                parts = None
            if parts and re.match(ID_PATTERN, parts.tenant) and re.match(ID_PATTERN, parts.task_id):
                await on_reject(parts.tenant, parts.task_id, raw.subject, told or reason)
        await msg.reject()

    async def _dead_letter(
        self,
        raw: Msg,
        headers: dict[str, str],
        durable: topo.Durable,
        kind: str,
        reason: str,
        where: tuple[int, int, float | None],
    ) -> None:
        """Copy the message to the DLQ with why, how often, and when it was first stored: charged to
        its tenant's dead-letter quota first. Over it, the dead letter is not kept (the original
        stays in its stream for the stream's retention), and that is counted and logged: one
        tenant's failing messages must not fill the DLQ for every tenant."""
        deliveries, seq, stored_at = where
        out = {
            f"{env.ORIG_PREFIX}{k}": env.one_line(v, 4000)
            for k, v in headers.items()
            if k not in (env.MSG_ID, "Nats-Expected-Stream")
        }
        out.update(
            {
                env.DLQ_REASON: env.one_line(reason),
                env.DLQ_KIND: kind,
                env.DLQ_SERVICE: self.service,
                env.DLQ_SUBJECT: raw.subject,
                env.DLQ_STREAM: durable.stream,
                env.DLQ_SEQ: str(seq),
                env.DLQ_DELIVERIES: str(deliveries),
                env.DLQ_STORED_AT: f"{stored_at:.6f}" if stored_at is not None else "",
                env.MSG_ID: f"dlq:{durable.stream}:{seq}:{self.service}" if seq else f"dlq:{time.time_ns()}",
            }
        )
        subject = topo.dlq_subject(self.service, raw.subject)
        tenant = _tenant_of(raw.subject)
        charged_at, size = 0.0, len(subject) + len(raw.data) + sum(len(k) + len(v) + 4 for k, v in out.items())
        if self.quotas is not None:
            refusal, charged_at = await self.quotas.charge(tenant, topo.DLQ_STREAM, size)
            if refusal is not None:
                self.count(tel.M_DLQ_DROPPED, {"tenant": tenant, "code": refusal.code})
                self.rejections.warn(
                    f"dead letter of {raw.subject} seq={seq} not kept: tenant {tenant} is over its dead-letter "
                    f"quota ({refusal.reason}); the original stays in {durable.stream}"
                )
                return
        try:
            ack = await self.broker.publish(raw.data, subject, headers=out, stream=topo.DLQ_STREAM, timeout=10.0)
        except Exception:
            if self.quotas is not None:
                await self.quotas.refund(tenant, topo.DLQ_STREAM, size, charged_at)
            raise
        if self.quotas is not None and getattr(ack, "duplicate", False):
            await self.quotas.refund(tenant, topo.DLQ_STREAM, size, charged_at)

    # --- request/reply --------------------------------------------------------------------

    def serve(
        self, contract: type[C], handler: Callable[[C, Delivery], Awaitable[Contract]], *, every_replica: bool = False
    ) -> None:
        """Answer core-NATS requests for ``contract`` (queue group shared by all replicas, or with
        ``every_replica`` each replica answers: the asker gathers the answers), from ``start`` on
        (after the start hooks), ``MESH_MAX_WORKERS`` at a time."""
        if self.service not in contract.spec.consumers or contract.spec.transport != "request":
            raise LookupError(f"{self.service} does not serve {contract.type_name()}")
        pattern = f"{contract.spec.domain}.*.*.*.{contract.spec.event}"

        async def entry(raw: Msg) -> None:
            headers = dict(raw.headers or {})
            try:
                model = parse_message(raw.subject, raw.data, strict=self.settings.strict_contracts, limits=self.limits)
                sender = await self.verify_current(
                    lambda: self.verifier.verify(
                        headers.get(env.IDENTITY), raw.data, model, msg_id=headers.get(env.MSG_ID, "")
                    )
                )
            except (ContractError, IdentityError) as exc:
                self.count(tel.M_REJECTED)
                self.rejections.warn(f"rejected request on {raw.subject}: {_rejection(exc)}")
                return  # the requester times out; an unverified sender learns nothing
            if not isinstance(model, contract):  # another version's message on the same subject shape
                self.count(tel.M_REJECTED)
                self.rejections.warn(f"rejected request on {raw.subject}: not a {contract.schema_id()}")
                return
            answer = await handler(
                model, Delivery(self, sender, raw.subject, headers.get(env.MSG_ID, ""), 1, headers, body=raw.data)
            )
            body = answer.to_bytes()
            await self.nc.publish(raw.reply, body, headers=env.headers_for(self.signer, answer, body, ""))
            self.count(tel.M_HANDLED)

        self._served.append((pattern, entry, every_replica))

    async def _serve(self) -> None:
        """Subscribe every ``serve`` handler. Straight on nats-py, not a FastStream subscriber: its
        consume path (middlewares, a span and metrics of its own, a task group per message) was a
        quarter of the budget's reservation handling. Requests are answered MESH_MAX_WORKERS at a
        time, as replicas would: one at a time, each would wait for every request ahead of it and
        its round trips (another tenant's burst too)."""
        for pattern, entry, every_replica in self._served:
            on_request = self._answerer(entry, asyncio.Semaphore(max(1, self.settings.max_workers)))
            queue = "" if every_replica else topo.queue_group(self.service)
            self._serving.append(await self.nc.subscribe(pattern, queue=queue, cb=on_request))

    def _answerer(
        self, entry: Callable[[Msg], Awaitable[None]], slots: asyncio.Semaphore
    ) -> Callable[[Msg], Awaitable[None]]:
        """The subscription's callback: take a slot (all busy: the rest wait in the subscription's
        queue), answer in a task of its own, under the requester's trace."""

        async def answer(raw: Msg) -> None:
            try:
                parent = propagate.extract(dict(raw.headers or {}))
                with self.tracer.start_as_current_span(
                    f"{raw.subject} process", context=parent, kind=trace.SpanKind.CONSUMER,
                    attributes={"messaging.system": "nats", "messaging.destination.name": raw.subject},
                ):  # fmt: skip
                    await entry(raw)
            except Exception:  # a handler bug or a backing service down: the requester asks again
                log.exception("answering %s failed", raw.subject)
            finally:
                slots.release()

        async def on_request(raw: Msg) -> None:
            await slots.acquire()
            task = asyncio.create_task(answer(raw))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)

        return on_request

    async def _stop_serving(self) -> None:
        """Take no more requests, and let those being answered finish (the graceful timeout)."""
        for sub in self._serving:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._serving.clear()
        if self._answering:
            await asyncio.wait(set(self._answering), timeout=self.settings.graceful_timeout_s)

    # --- state ----------------------------------------------------------------------------

    async def kv(self, bucket: str) -> Any:
        """Bind a provisioned KV bucket (never creates it; see ``state.bind``)."""
        return bind(self.nc, bucket)


def _tenant_of(subject: str) -> str:
    """The tenant a message's subject names, or ``-`` for a subject of no tenant's shape."""
    try:
        tenant = split_subject(subject).tenant
    except ContractError:
        return "-"
    return tenant if re.match(ID_PATTERN, tenant) else "-"


def _rejection(exc: Exception) -> str:
    """The dead letter's reason: ``decode: ...`` (the bounded decoder), ``contract: ...`` or ``identity: ...``."""
    if isinstance(exc, BodyError):
        return str(exc)
    return f"{'identity' if isinstance(exc, IdentityError) else 'contract'}: {exc}"


async def _the_message(msg: NatsMessage) -> NatsMessage:
    """FastStream's decoder for every mesh subscriber: the message itself, which the handler
    receives as its one argument (the broker runs without dependency injection). The framework
    would otherwise json-parse every body before the handler runs, and a hostile body (nesting
    thousands deep, a 5,000-digit integer) would raise inside it, before the mesh could
    dead-letter it with a reason."""
    return msg


def _file_state(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of a file: a rotation replaces the file, which changes both."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns
