"""In-process stand-ins for what a service's handlers use of a ``Mesh``, for unit tests that
drive handlers directly (no broker): what is published is collected, budget requests are
granted, spans go to an in-memory exporter."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mesh_contracts.v1 import BudgetDenied, BudgetGranted
from mesh_contracts.v1.audit import GENESIS
from mesh_durable import chain
from mesh_durable.chain import Head
from mesh_kit import envelope as env


@dataclass(eq=False)  # compared (and hashed) by identity, as a Mesh is
class FakeMesh:
    """What the worker's loop uses of a Mesh: publish, progress, emit, count, budget requests, a tracer."""

    deny: dict[str, str] = field(default_factory=dict)
    """model -> the denial code the budget answers a reservation for it with (others are granted)."""
    published: list[Any] = field(default_factory=list)
    reserved: list[Any] = field(default_factory=list)
    audited: list[Any] = field(default_factory=list)
    """(tenant, task, kind, key, the rest) of each record appended to an audit chain."""
    service: str = "worker"

    def __post_init__(self) -> None:
        self.spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.tracer = provider.get_tracer("test")
        self.metrics = InMemoryMetricReader()
        self.meter = MeterProvider(metric_readers=[self.metrics]).get_meter("test")
        chain.install(self, self)  # what a service appends to its tenants' audit chains lands in ``audited``

    async def request(self, m: Any) -> Any:
        self.reserved.append(m)
        if m.model in self.deny:
            return BudgetDenied(
                tenant=m.tenant, task_id=m.task_id, reason=f"{m.model} refused", code=self.deny[m.model]
            )
        return BudgetGranted(tenant=m.tenant, task_id=m.task_id, reservation_id=f"r-{m.call_id}",
                             remaining_tokens=100_000)  # fmt: skip

    async def publish(self, m: Any, key: str, causation: str | None = None, priority: int | None = None) -> None:
        self.published.append(env.stamped(m))  # as Mesh.publish: the release of the task being handled

    async def progress(self, *a: Any, **kw: Any) -> None:
        self.published.append(("progress", a, kw))

    async def append(self, tenant: str, task_id: str, kind: str, key: str, **kw: Any) -> int:
        """The audit chain's appender of this mesh (``mesh_durable.chain.of``): it records."""
        self.audited.append((tenant, task_id, kind, key, kw))
        return len(self.audited)

    async def head(self, tenant: str) -> Head:
        return Head(0, len(self.audited), GENESIS)

    async def emit(self, m: Any) -> None:
        pass

    async def newest_trust(self) -> Any:
        """The bundle a test gave this mesh (``verifier.bundle``): there is no newer one to read."""
        return self.verifier.bundle  # type: ignore[attr-defined]

    def count(self, name: str, attributes: dict[str, str] | None = None) -> None:
        pass

    def all(self, cls: type) -> list[Any]:
        return [m for m in self.published if isinstance(m, cls)]

    def last(self, cls: type) -> Any:
        return self.all(cls)[-1]


@dataclass
class FakeDelivery:
    """What handlers use of a ``Delivery``: its id, attempt and owner, and a heartbeat that does nothing."""

    msg_id: str = "m-1"
    deliveries: int = 1
    owner: str = "test"

    def keepalive(self) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()
