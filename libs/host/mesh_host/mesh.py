"""The mesh bus: what a service registers and runs, put together from the runtime's parts.

A service builds one ``Mesh`` and registers handlers with ``consume`` (JetStream durable pull
consumers that provisioning created) or ``serve`` (core request/reply), then ``start``s it.
The parts, each a module of its own:

- ``connection``: the NATS connection as the service's identity; signed publishing, requests, KV;
- ``trust``: the trust bundle, signing key and credentials, followed while running;
- ``fair``: each durable fetched ahead and served tenant by tenant (the one way messages come in);
- ``consume``: the pipeline every message goes through: decode -> verify -> handle -> settle;
- ``reply``: answering core requests;
- ``tenants``: the seam of the tenants' policy above the bus (``mesh_tenancy``: their doors and quotas).

Ack policy, explicitly: a handler that returns acks; one that raises ``Reject`` (or a
contract/identity failure) dead-letters and TERMs at once; any other exception NAKs with
a growing delay until ``MAX_DELIVER`` attempts, then dead-letters and TERMs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats
from faststream.security import BaseSecurity
from nats.aio.client import Client as NATS
from nats.js.api import PubAck
from nats.js.errors import NotFoundError

from mesh_contracts import Contract, DecodeLimits, sealing
from mesh_contracts import topology as topo
from mesh_contracts.v1 import ProgressEvent
from mesh_host.ask import ask
from mesh_host.deps import Dependency, readiness
from mesh_host.errors import HostError
from mesh_host.handoff import Journal
from mesh_identity import Signer, TrustBundle, Verifier
from mesh_identity.datakeys import Keyring, read_key_file
from mesh_kit import envelope as env
from mesh_kit import telemetry as tel
from mesh_kit import wire
from mesh_kit.connection import Connection
from mesh_kit.consume import Pipeline, Settle
from mesh_kit.delivery import Delivery, RejectHook
from mesh_kit.fair import FairConsumer
from mesh_kit.reply import Server
from mesh_kit.settings import ServiceSettings
from mesh_kit.state import KV
from mesh_kit.tenants import Tenancy
from mesh_kit.throttle import Throttled
from mesh_kit.trust import Trust

__all__ = ["Mesh"]
log = logging.getLogger("mesh.bus")
C = TypeVar("C", bound=Contract)
V = TypeVar("V")


@dataclass
class Stats:
    counters: Counter[str] = field(default_factory=Counter)
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
        self.stats = Stats()
        self.tracer = self.telemetry.tracer_provider.get_tracer("mesh_kit")
        self._meter = self.telemetry.meter_provider.get_meter("mesh_kit")
        self._counters: dict[str, Any] = {}  # created on first use; names come from mesh_kit.telemetry
        self.trust = Trust(settings, lambda: self.nc, self.count, signer=signer, verifier=verifier)
        if settings.data_key_file is not None:  # tenants' content sealed at rest (issue 42)
            kek = read_key_file(settings.data_key_file)
            sealing.install(Keyring(kek, lambda: self.trust.verifier.bundle.data_keys))
        self.connection = Connection(settings, self.trust, self.tracer, self.count, security=security)
        self.limits = DecodeLimits(
            max_bytes=settings.decode_max_bytes,
            max_depth=settings.decode_max_depth,
            max_int_digits=settings.decode_max_int_digits,
        )
        self.rejections = Throttled(log, settings.rejection_log_per_min)
        self.settle = Settle(self.connection, lambda: self.tenancy, self.count, self.rejections)
        self.server = Server(self.connection, self.limits, self.count, self.rejections)
        self.pipelines: dict[str, Pipeline] = {}  # by durable name: what ``consume`` bound
        self._fair: list[FairConsumer] = []
        self._durables: list[topo.Durable] = []  # every durable ``consume`` bound, in order
        self.doors: list[topo.Door] = []
        """The doors of the tenant-written contracts it consumes (``consume``): its tenancy opens them."""
        self.tenancy: Tenancy | None = None
        """What its tenants are held to: their doors and quotas (``mesh_tenancy.install``). None:
        no doors, nothing charged (a test's or a tool's mesh)."""
        self._on_start: list[Callable[[], Awaitable[None]]] = []
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self._on_stop_connected: list[Callable[[], Awaitable[None]]] = []
        self.waiting_for: str = ""  # why start() is waiting (a durable not provisioned yet)
        self.dependencies: dict[str, Dependency] = {}
        """Backing services besides NATS (Redis), probed in the background; see ``depend``."""
        self.reports: dict[str, Callable[[], Any]] = {}
        self.handoff = Journal(settings.handoff_file, settings.ack_wait_s) if settings.handoff_file else None
        """This process's list of the messages it holds, for its successor (``mesh_host.handoff``)."""

    # --- what the parts hold -----------------------------------------------------------------

    @property
    def nc(self) -> NATS:
        return self.connection.nc

    @property
    def signer(self) -> Signer:
        """The key this service signs with now (a rotation replaces it while running)."""
        return self.trust.signer

    @property
    def verifier(self) -> Verifier:
        return self.trust.verifier

    @verifier.setter
    def verifier(self, verifier: Verifier) -> None:
        self.trust.verifier = verifier

    @property
    def lost(self) -> asyncio.Event:
        """Set when the server closed the connection for good: the process should exit."""
        return self.connection.lost

    async def verify_current(self, check: Callable[[], V]) -> V:
        """``check()`` judged again under the newest published bundle if it failed on a key not
        known here yet (``Trust.verify_current``)."""
        return await self.trust.verify_current(check)

    async def newest_trust(self) -> TrustBundle:
        """The trust bundle as last published, read now (``Trust.newest_trust``)."""
        return await self.trust.newest_trust()

    async def kv(self, bucket: str) -> KV:
        """Bind a provisioned KV bucket (never creates it; see ``state.bind``)."""
        return await self.connection.kv(bucket)

    # --- counting ----------------------------------------------------------------------------

    @property
    def meter(self) -> Any:
        """The service's OTel meter, for instruments with their own attributes (histograms)."""
        return self._meter

    def count(self, name: str, attributes: dict[str, str] | None = None) -> None:
        """Both views of one count: the OTel metric (exported; with ``attributes`` besides the
        service) and /status (local, instant; the total)."""
        self.stats.counters[name] += 1
        if name not in self._counters:
            self._counters[name] = self._meter.create_counter(name, unit="{event}")
        self._counters[name].add(1, {"service": self.service, **(attributes or {})})

    # --- registering -------------------------------------------------------------------------

    def consume(
        self,
        contract: type[C],
        handler: Callable[[C, Delivery], Awaitable[None]],
        *,
        max_workers: int | None = None,
        on_reject: RejectHook | None = None,
        pool: str = "",
    ) -> None:
        """Bind ``handler`` to this service's pre-provisioned durable for ``contract`` (a worker
        pool's own durable, given ``pool``: ``topology.pool_durables``).

        ``on_reject(tenant, task, subject, reason)`` runs whenever this durable gives up on a
        message: rejected on arrival (contract or identity), rejected by the handler, or
        dead-lettered after its last attempt. The task's owner uses it to tell the client.
        A contract tenants write (``topology.doors``) is handed in at this service's door, which
        its tenancy opens at ``start``: checked, charged to the tenant's quota, then stored."""
        durable = topo.durable_for(self.service, contract, pool)
        self._durables.append(durable)
        door = topo.door_of(contract)
        if door is not None and door.service == self.service and door not in self.doors:
            self.doors.append(door)  # tenants hand it in here (``mesh_tenancy.door``)
        pipeline = Pipeline(
            durable, handler, on_reject, settings=self.settings, trust=self.trust, settle=self.settle,
            limits=self.limits, tracer=self.tracer, count=self.count, rejections=self.rejections,
        )  # fmt: skip
        self.pipelines[durable.name] = pipeline
        # Fetched ahead and taken tenant by tenant (``mesh_kit.fair``), not in stored order.
        self._fair.append(
            FairConsumer(
                lambda: self.nc,
                durable.stream,
                durable.name,
                self.settings.inbox_prefix + ".",
                pipeline,
                workers=max_workers or self.settings.max_workers,
                window=self.settings.fair_window,
                ack_wait_s=self.settings.ack_wait_s,
                graceful_s=self.settings.graceful_timeout_s,
                hold_max_s=self.settings.hold_max_s,
                count=self.count,
                journal=self.handoff,
            )
        )

    def serve(
        self, contract: type[C], handler: Callable[[C, Delivery], Awaitable[Contract]], *, every_replica: bool = False
    ) -> None:
        """Answer core-NATS requests for ``contract`` (queue group shared by all replicas, or with
        ``every_replica`` each replica answers: the asker gathers the answers), from ``start`` on
        (after the start hooks), ``MESH_MAX_WORKERS`` at a time (``mesh_kit.reply``)."""
        self.server.add(contract, handler, every_replica=every_replica)

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

    # --- publishing --------------------------------------------------------------------------

    async def publish(
        self,
        model: Contract,
        key: str,
        *,
        causation: str | None = None,
        timeout: float = 10.0,
        priority: int | None = None,
    ) -> PubAck | None:
        """Publish to JetStream, signed, with a deterministic id built from ``key`` (``Connection.publish``)."""
        return await self.connection.publish(model, key, causation=causation, timeout=timeout, priority=priority)

    async def emit(self, model: Contract) -> None:
        """Fire-and-forget core-NATS publish of a live message (``Connection.emit``)."""
        await self.connection.emit(model)

    async def request(self, model: Contract, *, timeout: float | None = None) -> Contract:
        """Core request/reply; the reply is verified like any other message. Waits
        ``MESH_REQUEST_TIMEOUT_S`` for the answer unless told otherwise, asking again within it
        (``mesh_host.ask``)."""
        return await ask(lambda wait: self.connection.request(model, timeout=wait),
                         timeout or self.settings.request_timeout_s)  # fmt: skip

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

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self.doors and self.tenancy is None:  # a forgotten install must not open the quota hole
            raise HostError(f"{self.service} keeps doors ({', '.join(d.stream for d in self.doors)}) but has no "
                           "tenancy to open them: mesh_tenancy.install(mesh) before start")  # fmt: skip
        await self.connection.connect()
        await self._until_provisioned()
        await self._hand_back()  # before any consumer starts (a start hook may start one: the planner's timers)
        if self.tenancy is not None:
            await self.tenancy.prepare()
            self.connection.on_stored = self._stored_for
        await self.trust.follow()
        for hook in self._on_start:
            await hook()
        for dependency in self.dependencies.values():
            await dependency.check()  # the first /readyz already knows
            dependency.start()
        await self.server.start()
        if self.tenancy is not None:
            await self.tenancy.open()
        for consumer in self._fair:
            await consumer.start()
        self.connection.serving = True

    async def _hand_back(self) -> None:
        """NAK what this process's predecessor held when it died, so it is redelivered now rather
        than after ``ack_wait`` (``mesh_host.handoff``)."""
        if self.handoff is None:
            return
        replies = self.handoff.take_over()
        for reply in replies:
            with contextlib.suppress(nats.errors.Error):
                await self.nc.publish(reply, b"-NAK")
        if replies:
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await self.nc.flush(timeout=2)
            for _ in replies:
                self.count(tel.M_HANDED_BACK)
            log.info("handed back %d message(s) its predecessor held when it died", len(replies))

    def _stored_for(self, tenant: str, stream: str, subject: str, body: bytes, headers: dict[str, str]) -> None:
        """What this service stored for a tenant counts against the tenant's share of the stream
        (``Tenancy.stored``): its doors refuse a tenant whose tasks made the mesh store too much
        anywhere."""
        if self.tenancy is not None:
            self.tenancy.stored(tenant, stream, env.stored_size(subject, body, headers))

    async def _until_provisioned(self) -> None:
        """Wait until every durable this service consumes exists, not ready meanwhile.

        Streams and durables are made by ``meshctl provision`` (the provisioning Job), never by
        a service. A service started first (every object of a release applied at once, or NATS
        restored empty) used to either exit or report ready while consuming nothing, for good.
        Now it waits here, says why on /readyz and in its log, and starts once provisioning is
        done: the rollout converges whatever the order. Any error but "not found" (a permission
        violation) still fails."""
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
        self.connection.serving = False
        self.trust.stop()
        await self.server.stop()
        if self.tenancy is not None:
            await self.tenancy.close()
        for consumer in self._fair:
            await consumer.stop()
        if self.handoff is not None:
            self.handoff.close()
        if self.tenancy is not None:
            with contextlib.suppress(Exception):
                await self.tenancy.flush()  # what it stored for tenants since their last charge
        for hook in self._on_stop_connected:
            try:
                await hook()
            except Exception:  # the connection still closes, and the other hooks run
                log.exception("a stop hook failed while connected")
        await self.connection.close()
        for dependency in self.dependencies.values():
            await dependency.stop()
        for hook in self._on_stop:
            await hook()

    def ready(self) -> tuple[bool, str]:
        if self.lost.is_set():
            return False, "connection to NATS closed by the server"
        if not self.connection.serving:
            return False, self.waiting_for or "not started"
        errors = self.connection.permission_errors
        if errors:
            return False, f"{self.stats.counters[tel.M_PERMISSION_VIOLATIONS]} permission violation(s): {errors[-1]}"
        if not self.connection.connected:
            return False, "not connected to NATS"
        return readiness(self.dependencies)
