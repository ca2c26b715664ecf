"""OpenTelemetry set-up and the one registry of telemetry names (``mesh.`` prefix).

Exporters follow the standard ``OTEL_*`` variables: with ``OTEL_EXPORTER_OTLP_ENDPOINT``
set, spans and metrics go over OTLP; without it they stay in-process (tests attach an
in-memory exporter to the provider this returns).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

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
A_ATTEMPT = "mesh.llm.attempt"  # 1-based attempt number within one logical model call
A_ROUTE = "mesh.llm.route"  # the gateway route (tier) the call took
A_PROMPT_VERSION = "mesh.prompt.version"  # <prompt id>@<version>+<digest> of the prompt a call was built from
A_RELEASE = "mesh.release"  # the release of the tenant's behaviour the task runs (v1.release; absent: the packaged one)

# GenAI semantic-convention names, as plain strings: the semconv package constants moved
# to the GenAI conventions repository and are marked deprecated.
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_PROVIDER = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_AGENT_NAME = "gen_ai.agent.name"
GEN_AI_CONVERSATION_ID = "gen_ai.conversation.id"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"  # only with content capture on, PII-redacted
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"

# The OTel GenAI client metrics (semantic conventions), recorded by the side that calls a model
# (mesh_agent.metered), per attempt: the standard dashboards and alerts for LLM clients read these.
M_GEN_AI_TOKEN_USAGE = "gen_ai.client.token.usage"  # noqa: S105 - a metric name; histogram {token} by gen_ai.token.type
M_GEN_AI_DURATION = "gen_ai.client.operation.duration"  # histogram s; error.type on a failed attempt
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"  # noqa: S105 - an attribute name (input | output)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
"""The bucket boundaries the GenAI semantic conventions advise."""


class GenAIMetrics:
    """The two GenAI client histograms of one meter."""

    def __init__(self, meter: Any) -> None:
        self.tokens = meter.create_histogram(
            M_GEN_AI_TOKEN_USAGE, unit="{token}", description="Number of input and output tokens used",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )  # fmt: skip
        self.duration = meter.create_histogram(
            M_GEN_AI_DURATION, unit="s", description="GenAI operation duration",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )  # fmt: skip

    def record(
        self, *, provider: str, request_model: str, elapsed_s: float, response_model: str = "",
        input_tokens: int = 0, output_tokens: int = 0, error_type: str = "", operation: str = "chat",
        release: str = "",
    ) -> None:  # fmt: skip
        attrs = {GEN_AI_OPERATION: operation, GEN_AI_PROVIDER: provider, GEN_AI_REQUEST_MODEL: request_model}
        if release:  # which release of the tenant's behaviour made the call (a canary against the current one)
            attrs[A_RELEASE] = release
        if response_model:
            attrs[GEN_AI_RESPONSE_MODEL] = response_model
        if error_type:
            self.duration.record(elapsed_s, {**attrs, ERROR_TYPE: error_type})
            return
        self.duration.record(elapsed_s, attrs)
        self.tokens.record(input_tokens, {**attrs, GEN_AI_TOKEN_TYPE: "input"})
        self.tokens.record(output_tokens, {**attrs, GEN_AI_TOKEN_TYPE: "output"})


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
