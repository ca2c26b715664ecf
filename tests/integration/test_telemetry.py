"""One trace spans services through the broker; counters reach OpenTelemetry metrics."""

from __future__ import annotations

import pytest
from integration_helpers import connect, counter, eventually, in_memory, running, settings_for
from opentelemetry import trace

from mesh_contracts.v1 import ToolRequested
from mesh_host import Mesh
from mesh_kit import telemetry as tel
from mesh_planner import metrics as planner_metrics

pytestmark = pytest.mark.integration


async def test_a_trace_crosses_the_broker_and_counters_are_exported(integration_infra, unique):
    task = unique("trace")
    seen_trace: list[int] = []

    async def handler(m: ToolRequested, d) -> None:
        if m.task_id == task:
            seen_trace.append(trace.get_current_span().get_span_context().trace_id)

    producer_tel, producer_spans, _ = in_memory("worker")
    consumer_tel, consumer_spans, consumer_metrics = in_memory("tool-executor")
    worker = Mesh(settings_for(integration_infra, "worker"), producer_tel)
    executor = Mesh(settings_for(integration_infra, "tool-executor"), consumer_tel)
    executor.consume(ToolRequested, handler)
    async with running(executor), running(worker):
        with worker.tracer.start_as_current_span("agent step") as root:
            await worker.publish(
                ToolRequested(tenant="acme", task_id=task, step_id="s1", call_id="c1", tool="calculator"), key="c1"
            )
        await eventually(lambda: seen_trace, what="handled")
        await eventually(lambda: counter(consumer_metrics, tel.M_HANDLED) >= 1, what="metric")
        async with connect(integration_infra, "admin") as nc:
            stored = await nc.jetstream().get_last_msg("TOOL", f"tool.v1.acme.{task}.requested")
    trace_id = root.get_span_context().trace_id
    assert seen_trace == [trace_id], "the consumer's handler runs inside the producer's trace"
    assert f"{trace_id:032x}" in stored.headers["traceparent"], "context travels in headers, not the body"
    names = {s.name for s in consumer_spans.get_finished_spans()}
    assert "handle tool.requested" in names and any(n.endswith(" process") for n in names)
    assert {s.context.trace_id for s in consumer_spans.get_finished_spans()} == {trace_id}
    assert any(s.name.endswith(" publish") for s in producer_spans.get_finished_spans())


async def test_a_count_with_attributes_is_exported_with_them_and_totalled_for_status(integration_infra):
    """The planner counts refusals by tenant and code (what an alert on one tenant's refusals
    reads); /status keeps the total."""
    planner_tel, _, metrics = in_memory("planner")
    planner = Mesh(settings_for(integration_infra, "planner"), planner_tel)
    planner.count(planner_metrics.M_REFUSED, {"tenant": "acme", "code": "rate_limited"})
    planner.count(planner_metrics.M_REFUSED, {"tenant": "acme", "code": "rate_limited"})
    planner.count(planner_metrics.M_REFUSED, {"tenant": "globex", "code": "too_many_in_flight"})
    assert counter(metrics, planner_metrics.M_REFUSED, tenant="acme", code="rate_limited", service="planner") == 2
    assert counter(metrics, planner_metrics.M_REFUSED, tenant="globex", code="too_many_in_flight") == 1
    assert counter(metrics, planner_metrics.M_REFUSED) == 3 and planner.stats.counters[planner_metrics.M_REFUSED] == 3
