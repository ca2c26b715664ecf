"""Helpers for tests that act as mesh services against real infrastructure.

A uniquely named module, not ``conftest``: tests import these by name, and ``conftest`` is
ambiguous when several test folders are collected in one run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import nats
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mesh_host import Mesh
from mesh_kit import ServiceSettings
from mesh_kit import telemetry as tel
from mesh_testing.infra import Infra


def settings_for(infra: Infra, service: str, **overrides: Any) -> ServiceSettings:
    return infra.ids.settings(service, infra.nats_url, strict_contracts=True, **overrides)


@asynccontextmanager
async def running(mesh: Mesh) -> AsyncIterator[Mesh]:
    await mesh.start()
    try:
        yield mesh
    finally:
        await mesh.stop()


@asynccontextmanager
async def connect(infra: Infra, principal: str) -> AsyncIterator[nats.NATS]:
    nc = await nats.connect(
        infra.nats_url,
        **infra.ids.connect_options(principal),
        max_reconnect_attempts=0,
        name=f"test-{principal}",
    )
    try:
        yield nc
    finally:
        await nc.close()


async def eventually(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll with a deadline (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout}s")


def in_memory(service: str) -> tuple[tel.Telemetry, InMemorySpanExporter, InMemoryMetricReader]:
    """Telemetry that keeps spans and metrics in memory, for asserting on them."""
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return tel.Telemetry(provider, MeterProvider(metric_readers=[reader])), exporter, reader


def counter(reader: InMemoryMetricReader, name: str, **attributes: str) -> float:
    """Sum of a counter's points whose attributes include ``attributes``."""
    data = reader.get_metrics_data()
    if data is None:
        return 0
    return sum(
        p.value
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == name
        for p in m.data.data_points
        if all(p.attributes.get(k) == v for k, v in attributes.items())
    )
