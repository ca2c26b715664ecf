"""OpenTelemetry set-up and the one registry of telemetry names (``mesh.`` prefix).

Exporters follow the standard ``OTEL_*`` variables: with ``OTEL_EXPORTER_OTLP_ENDPOINT``
set, spans and metrics go over OTLP; without it they stay in-process (tests attach an
in-memory exporter to the provider this returns).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

# The bus runtime's metric names. A package's own are in its ``metrics`` module.
M_HANDLED = "mesh.messages.handled"
M_REJECTED = "mesh.messages.rejected"
M_DEAD_LETTERED = "mesh.messages.dead_lettered"
M_RETRIED = "mesh.messages.retried"
M_INFRA_RETRIED = "mesh.messages.rerun_broker_unavailable"  # re-run in place, no attempt spent
M_REDELIVERED = "mesh.messages.redelivered"  # received on a second or later delivery
M_HANDED_BACK = "mesh.messages.handed_back"  # NAKed at start: held by its predecessor when it died (mesh_host.handoff)
M_KEPT_ALIVE = "mesh.messages.kept_alive"  # in-progress acks the fair consumer sent for messages it holds
M_PERMISSION_VIOLATIONS = "mesh.nats.permission_violations"
M_TRUST_UPDATED = "mesh.identity.trust_updated"  # a published trust bundle (rotation, revocation) now in force
M_TRUST_CAUGHT_UP = (
    "mesh.identity.trust_caught_up"  # a token with a key unknown here verified under a newer published bundle
)
M_TRUST_REFUSED = "mesh.identity.trust_refused"  # a published bundle refused: not an operator's, or tampered
M_KEY_ROTATED = "mesh.identity.key_rotated"  # this service now signs with its rotated key
M_CREDS_ROTATED = "mesh.identity.creds_rotated"  # reconnected as the rotated NATS user
M_CONNECTION_LOST = "mesh.nats.connection_lost"  # the server closed the connection for good (revoked, refused)
M_STREAM_FULL = "mesh.stream.full"  # a publish a stream at its cap refused; attribute stream
M_DLQ_DROPPED = "mesh.dlq.dropped"  # a dead letter not kept: its tenant is over its dead-letter quota
M_DEPENDENCY_DOWN = "mesh.dependency.down"  # a backing service (Redis) became unreachable; attribute: dependency
ERROR_TYPE = "error.type"

# Span attribute names.
A_TENANT = "mesh.tenant"
A_TASK = "mesh.task_id"
A_STEP = "mesh.step_id"
A_MSG_TYPE = "mesh.message.type"
A_RELEASE = "mesh.release"  # the release of the tenant's behaviour the task runs (v1.release; absent: the packaged one)


@dataclass
class Telemetry:
    tracer_provider: TracerProvider
    meter_provider: MeterProvider


def setup(service: str) -> Telemetry:
    """Providers for one service process. ``OTEL_SERVICE_NAME`` defaults to the service folder name."""
    # OpenTelemetry's own standard OTEL_* variables, read as its SDKs do: not MESH_ settings.
    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", service), "service.namespace": "agentmesh"}
    )
    exporting = bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    # With nowhere to send spans, record none: every message would otherwise build spans and
    # their attributes for nothing (about a tenth of each service's CPU). Spans stay valid
    # contexts, so trace ids still travel in every message's headers and reach logs; an explicit
    # OTEL_TRACES_SAMPLER still decides.
    quiet = not exporting and not os.environ.get("OTEL_TRACES_SAMPLER")
    tracer_provider = TracerProvider(resource=resource, sampler=ALWAYS_OFF if quiet else None)
    readers = []
    if exporting:
        from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
        from opentelemetry.sdk.trace.export import SpanExporter

        spans: SpanExporter
        metrics: MetricExporter
        if os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc") == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc import metric_exporter, trace_exporter

            spans, metrics = trace_exporter.OTLPSpanExporter(), metric_exporter.OTLPMetricExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http import metric_exporter as http_metrics
            from opentelemetry.exporter.otlp.proto.http import trace_exporter as http_traces

            spans, metrics = http_traces.OTLPSpanExporter(), http_metrics.OTLPMetricExporter()
        tracer_provider.add_span_processor(BatchSpanProcessor(spans))
        readers.append(PeriodicExportingMetricReader(metrics))
    return Telemetry(tracer_provider, MeterProvider(resource=resource, metric_readers=readers))
